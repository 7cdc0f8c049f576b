"""The one-shot GPU check's bookkeeping: a row per measurement, the report that guards, logs and saves them, timing,
the machine description and the markdown table. Torch only, like gpu_check.py (the GPU machine has no web stack)."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


@dataclass
class Row:
    name: str
    what: str = ""
    status: str = "skipped"  # ok | skipped | error
    seconds: float | None = None  # median of the timed runs
    tflops: float | None = None
    peak_fraction: float | None = None  # TFLOP/s over the measured matmul TFLOP/s
    error: float | None = None  # relative (Frobenius) error against the row's reference, see note
    peak_gib: float | None = None
    note: str = ""
    reason: str = ""  # why a row was skipped or failed


@dataclass
class Report:
    plan: Any  # gpu_check.Plan
    budget_s: float
    only: list[str]
    json_path: Path | None
    machine: dict[str, Any]
    rows: dict[str, Row]
    start: float = field(default_factory=time.perf_counter)
    peak_tflops: float | None = None

    def run(
        self, name: str, measure: Callable[[], dict[str, Any]], skip: str | None = None, reserve_s: float = 0.0
    ) -> None:
        """Run one row's measurement with every guard; it returns Row fields plus optional `flops`. A row that
        needs `reserve_s` (a compile) is skipped unless that much of the budget is left."""
        row = self.rows[name]
        elapsed = time.perf_counter() - self.start
        if self.only and not any(part in name for part in self.only):
            skip = skip or "not selected (--only)"
        if skip is None and elapsed + reserve_s > self.budget_s:
            skip = f"time budget: {elapsed:.0f} s of {self.budget_s:.0f} s spent, row needs about {reserve_s:.0f} s"
        if skip is not None:
            row.status, row.reason = "skipped", skip
        else:
            self._measure(row, measure)
        self._log(row, elapsed, time.perf_counter() - self.start)
        self.write_json()

    def _measure(self, row: Row, measure: Callable[[], dict[str, Any]]) -> None:
        cuda = self.plan.device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            values = measure()
        except Exception as exc:  # one shot on a rented GPU: report and go on
            traceback.print_exc(file=sys.stderr)
            row.status, row.reason = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            _free_memory(self.plan.device)
            return
        flops = values.pop("flops", None)
        for key, value in values.items():
            setattr(row, key, value)
        row.status, row.reason = "ok", ""
        if flops is not None and row.seconds:
            row.tflops = flops / row.seconds / 1e12
            if self.peak_tflops:
                row.peak_fraction = row.tflops / self.peak_tflops
        if row.peak_gib is None and cuda:
            row.peak_gib = torch.cuda.max_memory_allocated() / GIB

    def _log(self, row: Row, started: float, ended: float) -> None:
        result = f"{row.seconds:.4g} s" if row.status == "ok" and row.seconds is not None else row.reason
        print(f"[{started:6.1f} -> {ended:6.1f} s] {row.name}: {row.status} {result}", file=sys.stderr, flush=True)

    def write_json(self) -> None:
        if self.json_path is None:
            return
        data = {
            "machine": self.machine,
            "plan": {k: str(v) for k, v in dataclasses.asdict(self.plan).items() if k != "model"},
            "elapsed_s": time.perf_counter() - self.start,
            "rows": [dataclasses.asdict(row) for row in self.rows.values()],
        }
        self.json_path.write_text(json.dumps(data, indent=2) + "\n")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> tuple[float, float, Any]:
    """(median seconds of `repeats` timed calls, seconds of the first call, last result) after `warmup` calls."""
    first = None
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        _sync(device)
        first = first if first is not None else time.perf_counter() - start
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), first if first is not None else times[0], result


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def machine_info(plan: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": plan.device,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": props.total_memory / GIB,
        }
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(report: Report) -> None:
    """Machine line, then one markdown row per Row in the report's (fixed) order, ready for docs/PERF.md."""
    info = report.machine
    device = info.get("gpu", f"CPU ({info['cpu']}, {info['threads']} threads)")
    print(
        f"{device}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, Python {info['python']}; "
        f"{info['date']}; {info['dtype']}; {time.perf_counter() - report.start:.0f} s"
    )
    print()
    print("| row | seconds | TFLOP/s | of matmul peak | rel. error | peak GiB | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in report.rows.values():
        notes = row.note if row.status == "ok" else f"{row.status}: {row.reason}"
        cells = [
            row.name,
            _fmt(row.seconds, ".4f" if report.plan.tiny else ".3f"),
            _fmt(row.tflops, ".3g"),
            _fmt(row.peak_fraction, ".0%"),
            _fmt(row.error, ".2e"),
            _fmt(row.peak_gib, ".1f"),
            notes.replace("|", "/"),
        ]
        print("| " + " | ".join(cells) + " |")
