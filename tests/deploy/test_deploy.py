"""deploy/: promtool accepts the Prometheus config and rules, each alert fires on the series it is meant for, and
the compose file, Grafana provisioning and Prometheus scrape target agree with each other and with the settings."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from aptserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TARGET = {"job": "aptserve", "instance": "aptserve:8000"}


def promtool(*args: str, cwd: Path = ROOT) -> None:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: apt-get install prometheus (Debian's package ships /usr/bin/promtool)")
    result = subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def load(relative: str):
    return yaml.safe_load((DEPLOY / relative).read_text())


def alert_rules() -> list[dict]:
    return [rule for group in load("prometheus/alerts.yml")["groups"] for rule in group["rules"]]


def test_promtool_accepts_config_and_rules():
    promtool("check", "config", "deploy/prometheus/prometheus.yml")
    promtool("check", "rules", "deploy/prometheus/alerts.yml")


def test_every_alert_has_for_severity_and_annotations():
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def series(name: str, values: str, **labels: str) -> dict:
    selector = ", ".join(f'{key}="{value}"' for key, value in (TARGET | labels).items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def bucket(le: str, values: str, route: str = "/v1/videos/sync") -> dict:
    return series("aptserve_request_duration_seconds_bucket", values, route=route, le=le)


def case(alert: str, at: str, inputs: list[dict], expected: list[dict]) -> dict:
    """One promtool unit test, samples 15 s apart; the test adds each alert's severity to `expected`."""
    return {
        "interval": "15s",
        "input_series": inputs,
        "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected}],
    }


def fires(alert: str, at: str, inputs: list[dict], **labels: str) -> dict:
    return case(alert, at, inputs, [{"exp_labels": TARGET | labels}])


def quiet(alert: str, at: str, inputs: list[dict]) -> dict:
    return case(alert, at, inputs, [])


def readyz(status: str, values: str) -> dict:
    return series("aptserve_requests_total", values, route="/readyz", status=status)


def requests(route: str, status: str, values: str) -> dict:
    return series("aptserve_requests_total", values, route=route, status=status)


CASES = [
    fires("AptserveDown", "2m", [series("up", "1 0x20")]),
    quiet("AptserveDown", "45s", [series("up", "1 0x20")]),
    fires("AptserveNotReady", "15m", [readyz("503", "0+1x80")]),  # never a 200, so no 200 series at all
    quiet("AptserveNotReady", "16m", [readyz("503", "0+1x20 20x60"), readyz("200", "_x20 1+1x60")]),
    fires(
        "AptserveHighErrorRate",
        "10m",
        [
            requests("/v1/videos/sync", "200", "0+10x40"),
            requests("/v1/videos/sync", "500", "0+1x40"),
            requests("/metrics", "200", "0+1000x40"),  # scrapes must not dilute the ratio
        ],
    ),
    quiet("AptserveHighErrorRate", "10m", [requests("/v1/videos/sync", "200", "0+10x40"), readyz("503", "0+50x40")]),
    fires(
        "AptserveHighLatency",
        "15m",
        [bucket("10", "0x60"), bucket("30", "0+1x60"), bucket("+Inf", "0+1x60")],
        route="/v1/videos/sync",
    ),
    quiet("AptserveHighLatency", "15m", [bucket("10", "0+1x60"), bucket("30", "0+1x60"), bucket("+Inf", "0+1x60")]),
    fires("AptserveQueueSaturated", "3m", [series("aptserve_queue_depth", "12x20")]),
    quiet("AptserveQueueSaturated", "3m", [series("aptserve_queue_depth", "11x20")]),
    fires("AptserveRejectingRequests", "7m", [series("aptserve_errors_total", "0+1x40", kind="queue_full")]),
    quiet("AptserveRejectingRequests", "7m", [series("aptserve_errors_total", "0+1x40", kind="validation")]),
    fires(
        "AptserveEngineStalled",
        "11m",
        [series("aptserve_inflight_requests", "1x60"), series("aptserve_frames_generated_total", "100x60")],
    ),
    quiet(
        "AptserveEngineStalled",
        "11m",
        [series("aptserve_inflight_requests", "1x60"), series("aptserve_frames_generated_total", "0+25x60")],
    ),
]


def test_each_alert_fires_on_its_series_and_not_otherwise(tmp_path):
    # Annotations are prose; promtool would compare them verbatim, so the copy under test has none.
    rules = load("prometheus/alerts.yml")
    severity = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            severity[rule["alert"]] = rule["labels"]["severity"]
    cases = copy.deepcopy(CASES)
    for check in (case["alert_rule_test"][0] for case in cases):
        for alert in check["exp_alerts"]:
            alert["exp_labels"]["severity"] = severity[check["alertname"]]
    covered = {case["alert_rule_test"][0]["alertname"] for case in CASES if case["alert_rule_test"][0]["exp_alerts"]}
    assert covered == severity.keys(), "every alert needs a case where it fires"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": cases}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)


def compose() -> dict:
    return load("compose.yaml")


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out.append((source, target))
    return out


def test_compose_services_images_and_build():
    services = compose()["services"]
    assert services.keys() == {"aptserve", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: pin the image tag, not {image!r}"
    build = services["aptserve"]["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()
    gpus = services["aptserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert [device["driver"] for device in gpus] == ["nvidia"]


def test_compose_mounts_exist():
    spec = compose()
    named = set(spec.get("volumes") or {})
    for name, service in spec["services"].items():
        for source, _ in mounts(service):
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in named, f"{name} uses volume {source!r}, not declared under volumes:"


def test_compose_environment_names_real_settings():
    service = compose()["services"]["aptserve"]
    env = service["environment"]
    unknown = {key for key in env if key.startswith("APTSERVE_")} - {
        f"APTSERVE_{name.upper()}" for name in Settings.model_fields
    }
    assert not unknown, f"not settings (pydantic-settings would ignore them silently): {sorted(unknown)}"
    assert env["APTSERVE_HOST"] == "0.0.0.0"
    assert env["APTSERVE_DATA_DIR"] in {target for source, target in mounts(service) if not source.startswith(".")}


def test_prometheus_scrapes_the_compose_service():
    services = compose()["services"]
    config = load("prometheus/prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "aptserve"]
    port = services["aptserve"]["environment"]["APTSERVE_PORT"]
    assert job["static_configs"][0]["targets"] == [f"aptserve:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    services = compose()["services"]
    grafana = dict(mounts(services["grafana"]))
    (source,) = load("grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = load("grafana/provisioning/dashboards/aptserve.yaml")["providers"]
    assert provider["type"] == "file" and grafana["./grafana/dashboards"] == provider["options"]["path"]
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/aptserve.json").read_text())
    uids = {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel.get("targets", [])}
    assert uids == {source["uid"]}
