"""Schemathesis against the live server's `/openapi.json`: every operation the document lists, positive and negative
data, every built-in check on; it fails on each response the schema does not describe (the schema must tell the
truth). Bounded and derandomized with a fixed seed, so a failure reproduces with the same cases.

It drives schemathesis' own engine (what `schemathesis run` runs: examples, coverage and fuzzing phases) rather
than `schemathesis.pytest.from_fixture`, whose per-operation subtests need a pytest internal (`Item._nodeid`)
that pytest 9.2 removed. Not covered, because `/openapi.json` does not list them: WS /v1/videos/stream (OpenAPI
has no WebSocket operations; tests/reliability/test_catalog.py covers it), the demo page `/`
(`include_in_schema=False`), and FastAPI's own `/docs`, `/docs/oauth2-redirect` and `/openapi.json`. The stateful
phase is off: the document declares no links between operations, so it would have nothing to chain (the create ->
retrieve -> download -> delete lifecycle is tested in tests/server/test_api.py)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events

KEY = "schemathesis-key"
SEED = 24
CONFIG = {
    "seed": SEED,
    "headers": {"Authorization": f"Bearer {KEY}"},
    "request-timeout": 30,  # a stalled generation fails its case instead of holding the run
    "continue-on-failure": True,  # every kind of failure of an operation, not only its first
    "generation": {"mode": "all", "max-examples": 10, "deterministic": True, "no-shrink": True, "database": "none"},
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": False},
    },
    "checks": {"enabled": True},  # every built-in check: schema, status, content type, headers, negative data, ...
}
# Small limits keep every accepted generation short (at most 64x64 for 0.5 s, 2 steps); the document must state
# them as this server enforces them.
SERVER = {"api_keys": KEY, "default_seconds": 0.25, "max_seconds": 0.5, "max_pixels": 64 * 64, "max_steps": 2}


def answer_line(response) -> str:
    return f"\n    -> {response.status_code} {response.content[:300].decode(errors='replace')}"


@dataclass
class Report:
    """What the engine tried and what did not hold, by operation."""

    cases: Counter = field(default_factory=Counter)
    failures: dict[str, dict[tuple[str, str], str]] = field(default_factory=lambda: defaultdict(dict))
    errors: list[str] = field(default_factory=list)

    def add_scenario(self, recorder) -> None:
        self.cases[recorder.label] += len(recorder.cases)
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.failure_info is not None:  # one reproduction per operation, check and kind of failure
                    failure, answer = check.failure_info.failure, recorder.interactions.get(case_id)
                    got = "" if answer is None or answer.response is None else answer_line(answer.response)
                    detail = f"{failure.message}\n    {check.failure_info.code_sample}{got}"
                    self.failures[recorder.label].setdefault((check.name, failure.title), detail)

    def summary(self) -> str:
        kinds = sum(map(len, self.failures.values()))
        lines = [
            f"schemathesis (seed {SEED}): {kinds} kinds of failure in {len(self.failures)} of {len(self.cases)} "
            f"operations, {len(self.errors)} errors; {sum(self.cases.values())} cases"
        ]
        for label, count in sorted(self.cases.items()):
            failed = self.failures.get(label, {})
            lines.append(f"  {label}: {count} cases, " + (f"{len(failed)} kinds of failure" if failed else "held"))
        return "\n".join(lines)

    def describe(self) -> str:
        """The summary, then one reproduction (curl and the server's answer) per kind of failure."""
        lines = [self.summary()]
        for label, failed in sorted(self.failures.items()):
            lines += [f"FAILED {label} [{check}] {title}: {detail}" for (check, title), detail in failed.items()]
        lines += [f"ERROR {error}" for error in self.errors]
        return "\n".join(lines)


def run_engine(url: str) -> Report:
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config, headers=CONFIG["headers"])
    report = Report()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            report.add_scenario(event.recorder)
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{event.label}: {type(event.value).__name__}: {event.value}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            report.errors += [f"{failure.title}: {failure.message}" for failure in event.failures]
    return report


def test_every_operation_conforms_to_the_schema(serve):
    report = run_engine(serve(**SERVER).url)
    print("\n" + report.summary())
    failed = {label: [f"{check}: {title}" for check, title in kinds] for label, kinds in report.failures.items()}
    print(
        "reliability",
        json.dumps({"schemathesis": {"cases": report.cases, "failures": failed, "errors": report.errors}}),
    )
    assert report.cases, "schemathesis generated no cases"
    if report.failures or report.errors:
        pytest.fail(report.describe(), pytrace=False)
