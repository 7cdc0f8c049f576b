"""The engine worker: a thread that owns the pipeline (and so the device), runs batches off the event loop, and
reports per-ticket events with timings. It never touches HTTP or metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aptserve.engines.group import GroupFailed
from aptserve.engines.pipeline import Cancelled, GenerationRequest, Pipeline
from aptserve.server.scheduler import ChunkReady, Failed, Finished, Scheduler, Started, Ticket

log = logging.getLogger("aptserve.worker")


@dataclass(frozen=True)
class WarmupShape:
    """One shape bucket run before the server says ready: a compiled backend compiles its graphs here."""

    size: str  # "WIDTHxHEIGHT"
    seconds: float
    batch: int = 1

    def __str__(self) -> str:
        return f"{self.size}, {self.seconds:g} s, batch {self.batch}"


class EngineWorker:
    def __init__(
        self,
        load: Callable[[], Pipeline],
        scheduler: Scheduler,
        warmup: Sequence[WarmupShape] = (WarmupShape("", 0.5),),
        complete_prompts: bool = True,
        on_group_restart: Callable[[], None] = lambda: None,
    ):
        self._load, self.scheduler, self.warmup = load, scheduler, tuple(warmup)
        self.complete_prompts = complete_prompts  # by the model's caption grammar (aptserve.engines.prompts)
        self.on_group_restart = on_group_restart  # a sequence-parallel group was restarted (counted by the server)
        self.pipeline: Pipeline | None = None
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self.load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aptserve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> list[Ticket]:
        """Stop taking work, let the running batch end its current chunk, return tickets that never started."""
        left = self.scheduler.close()
        self._stopping.set()
        self._thread.join(timeout)
        if self.pipeline is not None and self.pipeline.group is not None:
            self.pipeline.group.close()
        return left

    def _run(self) -> None:
        try:
            self.pipeline = self._load()
            self._warm_up()
        except BaseException as exc:  # reported through /readyz and the log; the thread ends
            log.exception("model failed to load")
            self.load_error = exc
            return
        self.ready.set()
        while (batch := self.scheduler.next_batch()) is not None:
            self.run_batch(batch)

    def _warm_up(self) -> None:
        """One generation per shape bucket and batch size; an empty size means the model's default size."""
        for i, shape in enumerate(self.warmup, 1):
            start = time.perf_counter()
            request = self.pipeline.request(["warm up"] * shape.batch, 0, shape.size or None, shape.seconds)
            for _ in self.pipeline.generate(request):
                pass
            log.info("warm-up %d/%d (%s) took %.2f s", i, len(self.warmup), shape, time.perf_counter() - start)

    def run_batch(self, batch: list[Ticket]) -> None:
        self._restart_group()  # a rank that died while the server was idle costs this batch a restart, not a failure
        now = time.monotonic()
        first = batch[0].request
        request = GenerationRequest(
            [t.request.prompt for t in batch],
            [t.request.seed for t in batch],
            first.width,
            first.height,
            first.frames,
            first.steps,
            complete_prompts=self.complete_prompts,
        )
        request = self.pipeline.complete_prompts(request)  # the one place prompts are completed; reported below
        num_chunks = self.pipeline.num_chunks(request)
        for ticket, encoded in zip(batch, request.prompts):
            ticket.deliver(Started(ticket.request.id, len(batch), now - ticket.accepted_at, encoded, num_chunks))
        timings: dict[str, float] = {}

        def cancelled() -> bool:  # a list, not all()'s short cut: every ticket is answered as soon as it stops
            return all([self._stopped(t) for t in batch])

        try:
            for chunk in self.pipeline.generate(request, cancelled):
                timings = chunk.timings
                for i, ticket in enumerate(batch):
                    if not self._stopped(ticket):
                        ticket.deliver(
                            ChunkReady(
                                ticket.request.id, chunk.index, chunk.num_chunks, chunk.start_frame, chunk.frames[i]
                            )
                        )
        except Cancelled:  # every ticket was answered as it stopped
            self.scheduler.refund(since=now)
            return
        except GroupFailed as exc:  # a sequence-parallel rank died or failed: the batch is lost, the group restarts
            for ticket in batch:
                if not ticket.done:
                    ticket.deliver(Failed(ticket.request.id, "rank_failed", str(exc)))
            self.scheduler.refund(since=now)
            self._restart_group()
            return
        except Exception as exc:
            log.exception("generation failed for %s", [t.request.id for t in batch])
            for ticket in batch:
                if not ticket.done:
                    ticket.deliver(Failed(ticket.request.id, "error", f"generation failed: {exc}"))
            self.scheduler.refund(since=now)
            return
        for ticket in batch:
            if not ticket.done:
                ticket.deliver(Finished(ticket.request.id, dict(timings), request.frames))

    def _restart_group(self) -> None:
        """Restart the pipeline's sequence-parallel group if a rank died or failed; /readyz says loading meanwhile.
        A restart that fails is tried again after 1, 2, 4 ... 60 s until one succeeds or the server stops."""
        group = self.pipeline.group
        if group is None or group.healthy():
            return
        self.ready.clear()
        delay = 1.0
        while True:
            try:
                group.restart()
                break
            except Exception:
                log.exception("sequence parallel: the group did not restart; trying again in %g s", delay)
            if self._stopping.wait(delay):
                return
            delay = min(60.0, 2 * delay)
        self.on_group_restart()
        self.ready.set()

    @staticmethod
    def _stopped(ticket: Ticket) -> bool:
        """True once the ticket is finished; the first time it is seen stopping, it is answered with Failed."""
        if ticket.done:
            return True
        reason = ticket.stop_reason()
        if reason is None:
            return False
        ticket.deliver(Failed(ticket.request.id, reason, "stopped during generation"))
        return True
