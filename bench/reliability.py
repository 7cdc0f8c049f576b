"""Run the reliability suite (tests/reliability: the bad-input catalog, schemathesis, the load test, kill -9 and
SIGTERM) and write its results table, with the command, machine and date, into docs/RELIABILITY.md between the
`<!-- results -->` markers; the rest of that page is prose kept by hand.

    python bench/reliability.py [--slow] [--doc docs/RELIABILITY.md]

`--slow` adds the larger load variant. A failing test is a row that did not hold, not an error of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from harness import machine_line, markdown_table

ROOT = Path(__file__).resolve().parents[1]
FILES = ["test_catalog.py", "test_schemathesis.py", "test_load.py", "test_crash.py"]
CATALOG = {
    "test_rest_json": "Bad input: REST JSON bodies, routes, methods",
    "test_multipart_and_forms": "Bad input: multipart and urlencoded forms",
    "test_query_strings": "Bad input: query strings",
    "test_headers": "Bad input: headers (keys, content types, origins, ranges, other keys' videos)",
    "test_raw_http": "Bad input: raw HTTP on a socket (framing, sizes, smuggling)",
    "test_websocket": "Bad input: WebSocket messages and auth",
}
BEGIN, END = "<!-- results -->", "<!-- /results -->"


def run_pytest(slow: bool, junit: Path) -> tuple[str, str]:
    """Run the suite with -s, echoing its output; returns (the command, everything it printed)."""
    command = [sys.executable, "-m", "pytest", *(f"tests/reliability/{f}" for f in FILES), "-s", "-q", "-rfE"]
    command += ["-p", "no:cacheprovider", f"--junitxml={junit}", "-m", "not gpu" if slow else "not slow and not gpu"]
    lines = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="")
            lines.append(line)
    shown = shlex.join(["python", "-m", "pytest", *command[3:]]).replace(str(junit), "report.xml")
    return shown, "".join(lines)


@dataclass(frozen=True)
class Outcome:
    """One test case as the junit report has it."""

    function: str
    param: str
    result: str  # passed, failed, error or skipped
    seconds: float
    message: str


def read_junit(path: Path) -> list[Outcome]:
    outcomes = []
    for case in ET.parse(path).iter("testcase"):
        function, _, param = case.get("name").partition("[")
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        result = "passed" if problem is None else {"failure": "failed"}.get(problem.tag, problem.tag)
        message = "" if problem is None else (problem.get("message") or problem.text or result).strip()
        outcomes.append(Outcome(function, param.rstrip("]"), result, float(case.get("time", 0)), message))
    return outcomes


def printed_results(output: str) -> dict[str, list[dict]]:
    """The `reliability {...}` lines the tests print, by key, in order."""
    results: dict[str, list[dict]] = defaultdict(list)
    for line in output.splitlines():
        if line.startswith("reliability {"):
            for key, value in json.loads(line.removeprefix("reliability ")).items():
                results[key].append(value)
    return results


def tally(outcomes: list[Outcome], function: str, param: str | None = None) -> tuple[str, float]:
    """('all', 'N of M' or 'did not run') for the cases of `function` (and `param`), and their seconds."""
    chosen = [o for o in outcomes if o.function == function and param in (None, o.param) and o.result != "skipped"]
    passed = sum(o.result == "passed" for o in chosen)
    verdict = "did not run" if not chosen else "all" if passed == len(chosen) else f"{passed} of {len(chosen)}"
    return verdict, sum(o.seconds for o in chosen)


def catalog_rows(outcomes: list[Outcome]) -> list[list[object]]:
    rows = []
    for function, label in CATALOG.items():
        verdict, took = tally(outcomes, function)
        tried = sum(o.function == function for o in outcomes)
        rows.append([label, f"{tried} cases", verdict, f"`test_catalog.py::{function}` ({took:.0f} s)"])
    return rows


def schemathesis_rows(outcomes: list[Outcome], results: dict) -> list[list[object]]:
    verdict, took = tally(outcomes, "test_every_operation_conforms_to_the_schema")
    what = "Schemathesis over `/openapi.json`: examples, coverage and fuzzing phases, every check, seed 24"
    for report in results.get("schemathesis", []):
        cases, failing = report["cases"], report["failures"]
        if failing or report["errors"]:
            kinds = sum(map(len, failing.values()))
            verdict = f"{len(cases) - len(failing)} of {len(cases)} operations; {kinds} kinds of failure"
        many = f"{sum(cases.values())} cases over {len(cases)} operations"
        return [[what, many, verdict, f"`test_schemathesis.py` ({took:.0f} s)"]]
    return [[what, "-", verdict, f"`test_schemathesis.py` ({took:.0f} s)"]]


def load_rows(outcomes: list[Outcome], results: dict) -> list[list[object]]:
    rows, mib = [], 2**20
    for load in results.get("load", []):
        got, start, end = load["outcomes"], load["start"], load["end"]
        variant = f"{load['clients']}x{load['seconds']}s"
        verdict, took = tally(outcomes, "test_load_loses_nothing_and_gives_back_what_it_took", variant)
        accepted, completed = got.get("job accepted", 0), load["accepted_jobs"].get("completed", 0)
        answered = sum(got.get(k, 0) for k in ("sync answered", "stream answered", "stream abandoned"))
        rows.append([
            f"Load: {load['clients']} clients for {load['seconds']} s against `--max-queue 4`, jobs and sync requests",
            f"{sum(got.values())} requests: {accepted} jobs and {answered} sync accepted, {got.get('429', 0)} 429s",
            f"{verdict}: {completed} of {accepted} jobs completed, {load['problems']} problems (5xx, 429 without "
            f"Retry-After, partial clips); resident {start['resident_bytes'] / mib:.0f} -> "
            f"{end['resident_bytes'] / mib:.0f} MiB, open files {start['open_files']} -> {end['open_files']}, "
            f"ffmpeg children left {end['children']}",
            f"`test_load.py` ({took:.0f} s)",
        ])  # fmt: skip
    return rows or [["Load test", "-", "did not run", "`test_load.py`"]]


def crash_rows(outcomes: list[Outcome], results: dict) -> list[list[object]]:
    kill = (results.get("kill_9") or [{}])[-1]
    term = (results.get("sigterm") or [{}])[-1]
    kill_verdict, kill_took = tally(outcomes, "test_kill_9_with_jobs_running_and_queued")
    term_verdict, term_took = tally(outcomes, "test_sigterm_drains_a_progressive_stream")
    at_kill = ", ".join(f"{n} {status}" for status, n in kill.get("at_kill", {}).items()) or "-"
    after = kill.get("after_restart", {})
    return [
        [
            f"kill -9 with jobs running and queued ({at_kill}), then a restart on the same data dir",
            f"{sum(after.values())} jobs + 1 earlier video",
            f"{kill_verdict}: {after.get('completed', 0)} completed after the restart; earlier video byte-identical: "
            f"{kill.get('earlier_identical', '-')}",
            f"`test_crash.py` ({kill_took:.0f} s)",
        ],
        [
            "SIGTERM while a progressive HTTP stream is in flight",
            "1 stream",
            f"{term_verdict}: {term.get('frames', '-')} of 25 frames arrived, exit status {term.get('exit', '-')}",
            f"`test_crash.py` ({term_took:.0f} s)",
        ],
    ]


def render(command: str, outcomes: list[Outcome], results: dict) -> str:
    rows = catalog_rows(outcomes) + schemathesis_rows(outcomes, results)
    rows += load_rows(outcomes, results) + crash_rows(outcomes, results)
    lines = [
        f"- Machine: {machine_line(os.cpu_count())}; loopback; model `tiny` (random weights) on the CPU.",
        f"- Command: `python bench/reliability.py`, which runs `{command}`.",
        "",
        markdown_table(["What was tried", "How many", "What held", "Test"], rows, align="llll"),
    ]
    failed = [o for o in outcomes if o.result in ("failed", "error")]
    if failed:
        lines += ["", "What did not hold in this run (first line of each failure):", ""]
        for o in failed:
            first = o.message.splitlines()[0][:200] if o.message else o.result
            lines.append(f"- `{o.function}[{o.param}]`: {first}" if o.param else f"- `{o.function}`: {first}")
            if o.function == "test_every_operation_conforms_to_the_schema":
                for label, kinds in (results.get("schemathesis") or [{}])[-1].get("failures", {}).items():
                    lines.append(f"  - {label}: {'; '.join(kinds)}")
    return "\n".join(lines)


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} section to fill")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    doc.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="also the larger load variant")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "report.xml"
        command, output = run_pytest(args.slow, junit)
        outcomes = read_junit(junit)
    table = render(command, outcomes, printed_results(output))
    write_doc(args.doc, table)
    print(f"\nwrote the results table into {args.doc}")


if __name__ == "__main__":
    main()
