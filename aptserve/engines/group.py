"""One pipeline on several processes: the sequence-parallel ranks behind `aptserve serve --sp N`.

This process is rank 0. It keeps the text encoder, the noise and the request loop; ranks 1..N-1 are child processes
(torch.multiprocessing, spawn) that load the same generator and VAE and wait for work. Before each generator pass and
each decode chunk, rank 0 sends the op down a pipe to every worker rank (the control channel: an idle rank waits on
its pipe, not in a collective that would time out) and broadcasts the op's tensors over the process group; then every
rank runs its share, `SequenceParallel` for the generator and `split_decode_chunk` for the VAE (engines.parallel).
The tensors travel over NCCL on CUDA (rank r on cuda:K+r, rank 0 on cuda:K) and over gloo on the CPU.

Cancellation stays inside a pass: after every generator block the ranks all-reduce a stop flag (over a gloo group, so
CUDA ranks do not wait for their streams) that rank 0 raises when the pipeline's `between_blocks` check says stop;
every rank then leaves the pass together and the group stays in step.

A rank that dies or fails breaks the group: the collective in flight errors (gloo sees a closed connection at once;
any rank waits at most `timeout_s` for a silent peer), rank 0 raises `GroupFailed` naming the rank and why (its exit
signal or its own exception), and `restart` stops the remaining workers, destroys the process group and starts a new
one; rank 0's weights stay loaded, the workers load theirs again. Tested with gloo on the CPU; on NCCL the failure
path is unverified (a dead peer leaves an NCCL collective waiting until the group's timeout).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import multiprocessing.connection
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aptserve.engines.backends.options import RunOptions
from aptserve.engines.loading import cast_model
from aptserve.engines.parallel import SequenceParallel, split_decode_chunk
from aptserve.engines.pipeline import Cancelled, Pipeline, load_generation_model
from aptserve.engines.vae import CausalVAE, DecodeCache

log = logging.getLogger("aptserve.group")


class GroupFailed(RuntimeError):
    """A rank died or failed during an op: the op's work is lost and the group needs `ParallelGroup.restart`."""


@dataclass(frozen=True)
class RankSpec:
    """What every rank runs: the model as rank 0 serves it, and how the group splits it."""

    model: str  # a checkpoint folder, a name under models/, a Wan2.1 folder or spec, or a preset
    device: str = "cpu"  # rank 0's: "cpu", "cuda" or "cuda:K"; rank r runs on cuda:K+r
    dtype: torch.dtype = torch.float32
    decoder: str = "full"
    options: RunOptions = field(default_factory=RunOptions)
    ulysses: int | None = None  # Ulysses degree; None: gcd(size, heads), the ring takes the rest
    threads: int = 1  # torch threads per rank on the CPU

    def rank_device(self, rank: int) -> str:
        if not self.device.startswith("cuda"):
            return "cpu"
        return f"cuda:{(torch.device(self.device).index or 0) + rank}"


class ParallelGroup:
    """`size` ranks running one pipeline's generator and decode; see the module docstring."""

    def __init__(self, spec: RankSpec, size: int, timeout_s: float = 120.0, load_timeout_s: float = 1800.0):
        if size < 2:
            raise ValueError(f"a sequence-parallel group has 2 or more ranks; got {size}")
        if spec.device.startswith("cuda"):
            needed = (torch.device(spec.device).index or 0) + size
            if torch.cuda.device_count() < needed:
                raise ValueError(
                    f"{size} ranks from {spec.device} need {needed} GPUs; {torch.cuda.device_count()} seen"
                )
        self.spec, self.size = spec, size
        self.timeout_s, self.load_timeout_s = timeout_s, load_timeout_s
        self.failure: str | None = "not started"  # why the group cannot run an op; None while it can
        self.restarts = 0
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._folder: tempfile.TemporaryDirectory | None = None
        self._dit: torch.nn.Module | None = None
        self._vae: CausalVAE | None = None
        self._sp: SequenceParallel | None = None
        self._flags: dist.ProcessGroup | None = None

    # -- life cycle ----------------------------------------------------------------------------------------------

    def attach(self, pipeline: Pipeline) -> Pipeline:
        """Start the ranks and make `pipeline` run its generator passes and decode chunks on them (in place)."""
        if not isinstance(pipeline.vae, CausalVAE):
            raise ValueError(f"the split decode runs a CausalVAE; this pipeline decodes with {type(pipeline.vae)}")
        self._dit, self._vae = pipeline.dit, pipeline.vae
        if self.spec.device == "cpu":
            torch.set_num_threads(self.spec.threads)
        self.start()
        pipeline.dit, pipeline.vae, pipeline.group = _GroupGenerator(self), _GroupDecoder(self), self
        return pipeline

    def start(self) -> None:
        """Spawn the worker ranks, wait until each has loaded the model, then form the process group."""
        if dist.is_initialized():  # the group is torch.distributed's default one: a process leads one at a time
            raise RuntimeError("this process already belongs to a torch.distributed process group")
        self._folder = tempfile.TemporaryDirectory(prefix="aptserve-group-")
        init = f"file://{self._folder.name}/rendezvous"
        context = mp.get_context("spawn")
        for rank in range(1, self.size):
            ours, theirs = context.Pipe()
            args = (rank, self.size, init, self.spec, self.timeout_s, theirs)
            process = context.Process(target=_worker_main, args=args, name=f"aptserve-rank-{rank}", daemon=True)
            process.start()
            theirs.close()
            self._procs.append(process)
            self._pipes.append(ours)
            log.info("sequence parallel: rank %d of %d is pid %d", rank, self.size, process.pid)
        try:
            self._wait_until_loaded()
            self._sp, self._flags = _join(0, self.size, init, self.spec, self.timeout_s, self._dit)
        except BaseException as exc:
            self._stop_workers(graceful=False)
            self.failure = str(exc) if isinstance(exc, GroupFailed) else _one_line(exc)
            raise
        self.failure = None

    def healthy(self) -> bool:
        """The group can run an op: not failed, and every worker rank alive."""
        if self.failure is None and not all(p.is_alive() for p in self._procs):
            self.failure = self._diagnose(None)
        return self.failure is None

    def restart(self) -> None:
        """Stop what is left of the group and start a new one (the workers reload the model)."""
        log.warning("sequence parallel: restarting the group (%s)", self.failure)
        self._stop_workers(graceful=False)
        self.restarts += 1
        self.start()

    def close(self) -> None:
        """Ask the workers to exit, then stop any that do not, and leave the process group."""
        self._stop_workers(graceful=self.failure is None)
        self.failure = "closed"

    def pids(self) -> list[int]:
        """The worker ranks' process ids, rank 1 first."""
        return [p.pid for p in self._procs]

    # -- ops, on rank 0 ------------------------------------------------------------------------------------------

    def generator_pass(self, x, t, text, text_mask, between_blocks: Callable[[], None] | None) -> torch.Tensor:
        """The generator's velocity for the whole clip, computed by every rank on its share of the tokens."""

        def run() -> torch.Tensor:
            self._send("dit", x, t, text, text_mask)
            self._dit.between_blocks = functools.partial(_agree_between_blocks, self._flags, between_blocks)
            try:
                return self._sp(x, t, text, text_mask)
            finally:
                self._dit.between_blocks = None

        return self._guarded(run)

    def init_decode_cache(self) -> DecodeCache:
        self._guarded(lambda: self._send("decode_start"))
        return self._vae.init_decode_cache()

    def decode_chunk(self, latent_frame: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        if latent_frame.shape[-2] < self.size:  # before anything is sent: the group stays in step
            raise ValueError(f"{latent_frame.shape[-2]} latent rows cannot be split across {self.size} ranks")

        def run() -> tuple[torch.Tensor, DecodeCache]:
            self._send("decode", latent_frame)
            return split_decode_chunk(self._vae, latent_frame, cache)

        return self._guarded(run)

    # -- internals -----------------------------------------------------------------------------------------------

    def _send(self, op: str, *tensors: torch.Tensor) -> None:
        """The op's name and tensor shapes down every worker's pipe, then the tensors over the group from rank 0."""
        header = (op, [(tuple(t.shape), t.dtype) for t in tensors])
        for pipe in self._pipes:
            pipe.send(header)
        for tensor in tensors:
            dist.broadcast(tensor.contiguous(), 0)

    def _guarded(self, run: Callable[[], Any]) -> Any:
        if self.failure is not None:
            raise GroupFailed(self.failure)
        try:
            return run()
        except Cancelled:  # every rank left the pass together; the group is in step
            raise
        except Exception as exc:  # anything else leaves the ranks at different points of the op
            self.failure = self._diagnose(exc)
            log.error("sequence parallel: %s", self.failure)
            raise GroupFailed(self.failure) from exc

    def _diagnose(self, exc: BaseException | None) -> str:
        """Which rank broke the group and how: a rank killed by a signal first, then a rank's own exception, then
        rank 0's. A peer's death makes the other ranks' collectives fail too, so those follow-on errors are left out."""
        deadline = time.monotonic() + 2.0  # time for ranks whose collectives just failed to report and exit
        killed, failed = [], []
        for rank, (process, pipe) in enumerate(zip(self._procs, self._pipes), 1):
            process.join(max(0.0, deadline - time.monotonic()) if exc is not None else 0.0)
            message = _last_failure(pipe)
            if process.exitcode is not None and process.exitcode < 0:
                killed.append(f"rank {rank} was killed ({_exit_reason(process.exitcode)})")
            elif message is not None:
                failed.append(f"rank {rank} failed: {message}")
            elif process.exitcode is not None:
                failed.append(f"rank {rank} exited ({_exit_reason(process.exitcode)})")
        reasons = killed or failed or ([f"rank 0 failed: {_one_line(exc)}"] if exc is not None else ["unknown"])
        return f"sequence-parallel group of {self.size} ranks: " + "; ".join(reasons)

    def _wait_until_loaded(self) -> None:
        pending = dict(enumerate(self._pipes, 1))
        deadline = time.monotonic() + self.load_timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GroupFailed(f"ranks {sorted(pending)} did not load the model within {self.load_timeout_s:g} s")
            waiting = [*pending.values(), *(self._procs[r - 1].sentinel for r in pending)]
            multiprocessing.connection.wait(waiting, timeout=min(left, 1.0))
            for rank, pipe in list(pending.items()):
                if pipe.poll():
                    message = pipe.recv()
                    if message[0] != "loaded":
                        raise GroupFailed(f"rank {rank} failed while loading: {message[1]}")
                    del pending[rank]
                elif not self._procs[rank - 1].is_alive():
                    code = self._procs[rank - 1].exitcode
                    raise GroupFailed(f"rank {rank} exited while loading ({_exit_reason(code)})")

    def _stop_workers(self, graceful: bool) -> None:
        if graceful:
            for pipe in self._pipes:
                with contextlib.suppress(OSError):
                    pipe.send(("close", []))
        for process in self._procs:
            process.join(10.0 if graceful else 0.0)
            if process.is_alive():
                process.kill()
                process.join(10.0)
        for pipe in self._pipes:
            pipe.close()
        self._procs, self._pipes = [], []
        if dist.is_initialized():
            dist.destroy_process_group()
        self._sp = self._flags = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


class _GroupGenerator:
    """Rank 0's generator: called like the MMDiT / WanTransformer it stands for; `between_blocks` as theirs."""

    def __init__(self, group: ParallelGroup):
        self.group = group
        self.between_blocks: Callable[[], None] | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.group.generator_pass(x, t, text, text_mask, self.between_blocks)


class _GroupDecoder:
    """Rank 0's VAE for the pipeline's streamed decode: `init_decode_cache` and `decode_chunk` on every rank."""

    def __init__(self, group: ParallelGroup):
        self.group = group

    def init_decode_cache(self) -> DecodeCache:
        return self.group.init_decode_cache()

    def decode_chunk(self, latent_frame: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        return self.group.decode_chunk(latent_frame, cache)


# ---------------------------------------------------------------------------------------------------------------
# Every rank
# ---------------------------------------------------------------------------------------------------------------


def _join(
    rank: int, size: int, init: str, spec: RankSpec, timeout_s: float, dit: torch.nn.Module
) -> tuple[SequenceParallel, dist.ProcessGroup]:
    """Join the process group; returns the generator's sequence-parallel runner and the group for stop flags."""
    device = spec.rank_device(rank)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=size, timeout=timeout)
    flags = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    return SequenceParallel(dit, ulysses=spec.ulysses), flags


def _agree_between_blocks(flags: dist.ProcessGroup, check: Callable[[], None] | None) -> None:
    """After each block on every rank: stop all ranks together when rank 0's check (the only one given) says so."""
    stop = torch.zeros(1)
    if check is not None:
        try:
            check()
        except Cancelled:
            stop += 1
    dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=flags)
    if stop.item():
        raise Cancelled("generation cancelled")


def _worker_main(
    rank: int, size: int, init: str, spec: RankSpec, timeout_s: float, pipe: multiprocessing.connection.Connection
) -> None:
    """A worker rank: load, report, join the group, then run ops until told to close or rank 0 goes away."""
    try:
        device = spec.rank_device(rank)
        if device == "cpu":
            torch.set_num_threads(spec.threads)
        model = load_generation_model(spec.model, device, spec.dtype, spec.decoder)
        dit = cast_model(model.dit.to(device), spec.dtype).eval()
        vae = cast_model(model.vae.to(device), spec.dtype).eval()
        spec.options.apply({"dit": dit, "vae": vae})
        pipe.send(("loaded",))
        sp, flags = _join(rank, size, init, spec, timeout_s, dit)
        with torch.inference_mode():
            _serve(sp, vae, flags, device, pipe)
    except (EOFError, BrokenPipeError):  # rank 0 is gone: nothing left to serve
        return
    except BaseException as exc:
        traceback.print_exc(file=sys.stderr)
        with contextlib.suppress(OSError):
            pipe.send(("failed", _one_line(exc)))
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(
    sp: SequenceParallel,
    vae: CausalVAE,
    flags: dist.ProcessGroup,
    device: str,
    pipe: multiprocessing.connection.Connection,
) -> None:
    cache: DecodeCache | None = None
    sp.generator.between_blocks = functools.partial(_agree_between_blocks, flags, None)
    while True:
        op, shapes = pipe.recv()
        if op == "close":
            return
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
        for tensor in tensors:
            dist.broadcast(tensor, 0)
        if op == "dit":
            with contextlib.suppress(Cancelled):
                sp(*tensors)
        elif op == "decode_start":
            cache = vae.init_decode_cache()
        elif op == "decode":
            if cache is None:
                raise RuntimeError("decode before decode_start")
            cache = split_decode_chunk(vae, tensors[0], cache)[1]
        else:
            raise RuntimeError(f"unknown op {op!r}")


def _last_failure(pipe: multiprocessing.connection.Connection) -> str | None:
    """The failure a worker reported before exiting, if any (its pipe holds nothing else once it fails)."""
    message = None
    try:
        while pipe.poll():
            received = pipe.recv()
            if received[0] == "failed":
                message = received[1]
    except (EOFError, OSError):
        pass
    return message


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


__all__ = ["GroupFailed", "ParallelGroup", "RankSpec"]
