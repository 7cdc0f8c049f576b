"""What the benchmarks share: the machine line every table starts with, medians of repeated runs, a markdown table,
and a free loopback port. Imported by the scripts beside it (`python bench/<name>.py` puts this folder first on the
path); torch is imported lazily, so serving benchmarks stay light."""

from __future__ import annotations

import datetime
import platform
import socket
import statistics
from collections.abc import Iterable, Mapping, Sequence


def machine_line(threads: int | None = None) -> str:
    """CPU, threads, Python and torch versions, and the date (UTC): enough to place a number in docs/PERF.md."""
    import torch

    threads = torch.get_num_threads() if threads is None else threads
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {threads} threads, Python {platform.python_version()}, torch {torch.__version__}, {today}"


def medians(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-key median over runs that all report the same keys."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A markdown table; `align` has one letter per column (l or r), right-aligned by default after the first."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
