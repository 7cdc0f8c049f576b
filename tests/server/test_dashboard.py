"""The Grafana dashboard and the Prometheus alerts query only series a live server exports, with label values it uses."""

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aptserve.server.app import create_app
from tests.server.conftest import LiveServer, make_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\baptserve_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(aptserve_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
TARGET_LABELS = {"job", "instance"}  # attached by Prometheus at scrape time, never in /metrics
DASHBOARD_METRICS = {  # what the dashboard must show (DESIGN section 5)
    "aptserve_requests_total",
    "aptserve_request_duration_seconds_bucket",
    "aptserve_time_to_first_chunk_seconds_bucket",
    "aptserve_stage_duration_seconds_bucket",
    "aptserve_queue_depth",
    "aptserve_queue_wait_seconds_bucket",
    "aptserve_inflight_requests",
    "aptserve_frames_generated_total",
    "aptserve_device_memory_bytes",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets in /metrics of a real server that has served one clip."""
    server = LiveServer(create_app(make_settings(tmp_path_factory.mktemp("dashboard")))).start()
    try:
        body = {"prompt": "a red circle moving left", "seconds": 1}
        response = httpx.post(server.url + "/v1/videos/sync", json=body, timeout=120)
        assert response.status_code == 200, response.text
        text = httpx.get(server.url + "/metrics", timeout=30).text
    finally:
        server.stop()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    return samples


def dashboard_exprs() -> list[str]:
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads((DEPLOY / "grafana/dashboards/aptserve.json").read_text())))


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def problems(exprs: list[str], exported: dict[str, list[dict[str, str]]]) -> list[str]:
    """Metric names missing from /metrics, and selector labels or exact label values it never shows."""
    found = []
    for name in sorted({m for expr in exprs for m in METRIC.findall(expr)} - exported.keys()):
        found.append(f"{name} is not in /metrics")
    for expr in exprs:
        for name, matchers in SELECTOR.findall(expr):
            labels = exported.get(name, [])
            for label, op, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS:
                    continue
                values = {sample[label] for sample in labels if label in sample}
                if not values:
                    found.append(f"{name} has no label {label!r} (in {expr!r})")
                elif op == "=" and value not in values:
                    found.append(f"{name}{{{label}={value!r}}} never appears; seen {sorted(values)}")
    return found


def test_dashboard_queries_exported_metrics(exported):
    exprs = dashboard_exprs()
    used = {m for expr in exprs for m in METRIC.findall(expr)}
    assert not DASHBOARD_METRICS - used, f"dashboard lacks panels for {sorted(DASHBOARD_METRICS - used)}"
    found = problems(exprs, exported)
    assert not found, found


def test_alerts_query_exported_metrics(exported):
    exprs = alert_exprs()
    assert any(METRIC.search(expr) for expr in exprs), "no alert reads an aptserve_ metric"
    found = problems(exprs, exported)
    assert not found, found


def test_problems_catches_wrong_names_and_label_values(exported):
    wrong = [
        "rate(aptserve_requests[5m])",  # counters are exported with _total
        "aptserve_request_duration_seconds",  # histograms only as _bucket/_sum/_count
        'aptserve_requests_total{route="/ready"}',
        'aptserve_stage_duration_seconds_bucket{phase="dit"}',
    ]
    assert len(problems(wrong, exported)) == len(wrong)
