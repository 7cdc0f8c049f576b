"""What every training stage shares: JSON stage configs, the run folder (resumable state, loss CSV), EMA, and the
loop that shows progress, checkpoints periodically and resumes after being killed."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

log = logging.getLogger("aptserve.training")
C = TypeVar("C")
STATE_NAME = "state.pt"
LOSSES_NAME = "losses.csv"


def load_stage_config(cls: type[C], path: str | Path | None, overrides: dict[str, Any] | None = None) -> C:
    """A stage config dataclass from a JSON file plus overrides; unknown keys raise ValueError naming them."""
    data: dict[str, Any] = {}
    if path is not None:
        data = json.loads(Path(path).read_text())
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown keys for {cls.__name__}: {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype:
    """A stage's `compute_dtype` by name; a bad name fails when the config is read, not hours into a run."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}; got {name!r}")
    return COMPUTE_DTYPES[name]


def autocast(name: str, device: str | torch.device = "cpu") -> torch.autocast:
    """Mixed precision for a stage's forward passes: bfloat16 runs matmuls and convs on the CPU's AMX / AVX512-BF16
    units (or GPU tensor cores) while weights, optimiser state and losses stay float32; float32 is a no-op."""
    dtype = compute_dtype(name)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of a module's parameters: ema = decay * ema + (1 - decay) * param.

    With `warmup` the n-th update uses min(decay, (1 + n) / (10 + n)), so a model trained from random weights
    does not keep a share of its initialisation (0.999^1500 = 22% after 1500 plain updates). Without it the
    average starts from the module as given, as APT's generator EMA does from the distilled model. A state saved
    without an update count restarts the warm-up."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        """The decay the next update applies."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.shadow = state["decay"], state["shadow"]
        self.warmup = state.get("warmup", self.warmup)
        self.updates = state.get("updates", 0)


class RunDir:
    """A stage's output folder: `state.pt` (everything needed to resume) and `losses.csv` (one row per log)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def state_file(self) -> Path:
        return self.path / STATE_NAME

    def save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_file)  # a kill mid-save leaves the previous state intact

    def load_state(self) -> dict[str, Any] | None:
        if not self.state_file.exists():
            return None
        return torch.load(self.state_file, map_location="cpu", weights_only=False)

    def log_row(self, row: dict[str, float]) -> None:
        file = self.path / LOSSES_NAME
        new = not file.exists()
        with open(file, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate_log(self, step: int) -> None:
        """Drop rows logged after the resumed step, so a resumed run's CSV has no duplicates."""
        file = self.path / LOSSES_NAME
        if not file.exists():
            return
        with open(file, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= step]
        if rows:
            with open(file, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            file.unlink()


class Trainer:
    """Runs `step_fn(step) -> losses` from the resumed step to `steps`, logging every `log_every` steps and saving
    `get_state()` every `checkpoint_every` steps, at the end, and on SIGTERM/SIGINT."""

    def __init__(
        self,
        run: RunDir,
        steps: int,
        get_state: Callable[[], dict[str, Any]],
        set_state: Callable[[dict[str, Any]], None],
        checkpoint_every: int = 200,
        log_every: int = 10,
        progress: bool = True,
        desc: str = "train",
    ):
        self.run, self.steps, self.get_state, self.set_state = run, steps, get_state, set_state
        self.checkpoint_every, self.log_every, self.progress, self.desc = checkpoint_every, log_every, progress, desc
        self.step = 0
        self._stop = False

    def resume(self) -> int:
        state = self.run.load_state()
        if state is not None:
            self.set_state(state["stage"])
            self.step = state["step"]
            torch.set_rng_state(state["torch_rng"])
            self.run.truncate_log(self.step)
            log.info("resumed %s at step %d", self.run.path, self.step)
        return self.step

    def save(self) -> None:
        self.run.save_state({"stage": self.get_state(), "step": self.step, "torch_rng": torch.get_rng_state()})

    def _request_stop(self, signum, frame) -> None:
        self._stop = True

    def fit(self, step_fn: Callable[[int], dict[str, float]]) -> int:
        from tqdm import tqdm

        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.steps, initial=self.step, desc=self.desc, disable=not self.progress, dynamic_ncols=True)
        sums: dict[str, float] = {}
        start = time.perf_counter()
        try:
            while self.step < self.steps and not self._stop:
                losses = step_fn(self.step)
                self.step += 1
                bar.update(1)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                if self.step % self.log_every == 0 or self.step == self.steps:
                    count = self.log_every if self.step % self.log_every == 0 else self.step % self.log_every
                    row = {
                        "step": self.step,
                        **{k: v / count for k, v in sums.items()},
                        "seconds": time.perf_counter() - start,
                    }
                    self.run.log_row(row)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k not in ("step", "seconds")})
                    sums = {}
                if self.step % self.checkpoint_every == 0:
                    self.save()
            self.save()
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.step


def infinite(loader) -> Any:
    while True:
        yield from loader
