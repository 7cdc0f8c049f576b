"""Summarise a stage's `losses.csv`: per step window, the mean of every logged column and seconds per step; and
from a given step on, each column's range (and, for APT logs, the largest gap between D's mean logits on real
and fake). The `seconds` column restarts when a run resumes; steps across a restart are left out of the timing.

    .venv/bin/python experiments/loss_summary.py runs/teacher-tiny/losses.csv --windows 901-1000 3301-3400
    .venv/bin/python experiments/loss_summary.py runs/apt-tiny/losses.csv --windows 91-190 --from 40
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
from pathlib import Path


def read(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def seconds_per_step(rows: list[dict[str, float]]) -> float | None:
    """Logged seconds over logged steps, over consecutive rows whose clock did not restart."""
    spent = steps = 0.0
    for before, after in itertools.pairwise(rows):
        if after["seconds"] > before["seconds"]:
            spent += after["seconds"] - before["seconds"]
            steps += after["step"] - before["step"]
    return spent / steps if steps else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--windows", nargs="*", default=[], help="step ranges FIRST-LAST, inclusive")
    parser.add_argument("--from", dest="start", type=int, help="ranges of every column from this step on")
    args = parser.parse_args()
    rows = read(args.csv)
    columns = [c for c in rows[0] if c not in ("step", "seconds")]
    print(
        f"{args.csv}: {len(rows)} rows, steps {rows[0]['step']:g}-{rows[-1]['step']:g}, "
        f"clock {rows[-1]['seconds']:.0f} s at the last row (since the last resume)"
    )
    if args.windows:
        print("| steps | " + " | ".join(f"mean {c}" for c in columns) + " | seconds/step |")
        print("|---|" + "---:|" * (len(columns) + 1))
        for window in args.windows:
            first, last = (int(v) for v in window.split("-"))
            inside = [r for r in rows if first <= r["step"] <= last]
            if not inside:
                raise SystemExit(f"no logged steps in {window}")
            rate = seconds_per_step([r for r in rows if first - 1 <= r["step"] <= last])
            means = " | ".join(f"{statistics.mean(r[c] for r in inside):.4g}" for c in columns)
            print(f"| {window} ({len(inside)} logged) | {means} | {'-' if rate is None else f'{rate:.2f}'} |")
    if args.start is not None:
        late = [r for r in rows if r["step"] >= args.start]
        print(f"from step {args.start} ({len(late)} logged):")
        for c in columns:
            print(f"  {c}: {min(r[c] for r in late):.4g} to {max(r[c] for r in late):.4g}")
        if "d_real" in columns and "d_fake" in columns:
            gap = max(abs(r["d_real"] - r["d_fake"]) for r in late)
            print(f"  largest |d_real - d_fake|: {gap:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
