"""deploy/k8s: the Kustomize base renders, every object validates against the Kubernetes schemas, and the objects
agree with each other and with the server (probe routes, port, settings, the metric KEDA scales on)."""

import functools
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from aptserve.server.metrics import Metrics
from aptserve.server.routes.system import router as system_router
from aptserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# The oldest Kubernetes still widely run and a recent one, both among the schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
SETTINGS = {f"APTSERVE_{name.upper()}" for name in Settings.model_fields}


@functools.cache
def rendered() -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: apt-get install kubernetes-client (Debian's kubectl renders Kustomize)")
    result = subprocess.run([kubectl, "kustomize", "deploy/k8s"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(kind: str) -> dict:
    (obj,) = [obj for obj in rendered() if obj["kind"] == kind]
    return obj


def container() -> dict:
    (main,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def config() -> dict[str, str]:
    return one("ConfigMap")["data"]


def test_renders_the_expected_objects():
    kinds = sorted(obj["kind"] for obj in rendered())
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "ScaledObject",
        ]
    )
    namespaced = [obj for obj in rendered() if obj["kind"] != "Namespace"]
    assert {obj["metadata"]["namespace"] for obj in namespaced} == {one("Namespace")["metadata"]["name"]}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_against_the_kubernetes_schemas(version):
    builtin = [obj for obj in rendered() if (obj["apiVersion"], obj["kind"]) not in CUSTOM]
    assert len(builtin) == len(rendered()) - len(CUSTOM)
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {error.message}")


def test_custom_resources_have_their_required_fields():
    # No schemas ship for CRDs: check the fields their controllers require, by the CRDs' own `required` lists.
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] and monitor["spec"]["endpoints"]
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] and spec["triggers"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        assert {"serverAddress", "query", "threshold"} <= trigger["metadata"].keys()
        assert float(trigger["metadata"]["threshold"]) > 0
        assert all(isinstance(value, str) for value in trigger["metadata"].values()), "KEDA metadata are strings"


def exposed_metric_names() -> set[str]:
    metrics = Metrics()
    metrics.observe_request("/healthz", 200, 0.01)
    body, _ = metrics.render()
    return {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if not line.startswith("#")}


def test_scaled_object_scales_on_the_queue_depth_the_server_exposes():
    scaled = one("ScaledObject")
    deployment = one("Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    names = set(re.findall(r"\b(aptserve_[a-z_]+)\b", query))
    # each replica's own waiting requests, plus the shared queue's backlog once replicas share PostgreSQL
    assert names == {"aptserve_queue_depth", "aptserve_shared_queue_depth"}, query
    assert names <= exposed_metric_names()
    # the series as the ServiceMonitor labels them: job from the Service's name label, and this namespace
    service = one("Service")
    job = service["metadata"]["labels"][one("ServiceMonitor")["spec"]["jobLabel"]]
    assert query.count(f'job="{job}"') == query.count(f'namespace="{scaled["metadata"]["namespace"]}"') == 2


def test_probes_hit_the_server_routes():
    routes = {route.path for route in system_router.routes}
    main = container()
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["startupProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["path"] in routes
    monitor_paths = {endpoint["path"] for endpoint in one("ServiceMonitor")["spec"]["endpoints"]}
    assert monitor_paths == {"/metrics"} <= routes
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load and warm-up take minutes"


def port_number(port: int | str, ports: list[dict]) -> int:
    return port if isinstance(port, int) else {p["name"]: p["containerPort"] for p in ports}[port]


def test_ports_agree_with_the_server():
    ports = container()["ports"]
    (http,) = ports
    assert http["containerPort"] == Settings.model_fields["port"].default == int(config()["APTSERVE_PORT"])
    (service_port,) = one("Service")["spec"]["ports"]
    assert port_number(service_port["targetPort"], ports) == http["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_number(container()[probe]["httpGet"]["port"], ports) == http["containerPort"]
    (endpoint,) = one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]


def selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_selectors_reach_their_objects():
    deployment = one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], pod_labels)
    assert one("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert selects(one("PodDisruptionBudget")["spec"]["selector"], pod_labels)
    assert selects(one("ServiceMonitor")["spec"]["selector"], one("Service")["metadata"]["labels"])


def test_environment_names_real_settings():
    unknown = {key for key in config() if key.startswith("APTSERVE_")} - SETTINGS
    assert not unknown, f"not settings (pydantic-settings would ignore them silently): {sorted(unknown)}"
    Settings(**{key.removeprefix("APTSERVE_").lower(): value for key, value in config().items()})  # values parse
    main = container()
    (source,) = main["envFrom"]
    assert source["configMapRef"]["name"] == one("ConfigMap")["metadata"]["name"]
    secrets = {env["name"]: env["valueFrom"]["secretKeyRef"] for env in main["env"]}
    assert "APTSERVE_API_KEYS" in secrets and set(secrets) <= SETTINGS
    assert not secrets["APTSERVE_API_KEYS"].get("optional"), "no Secret must not mean an open server"


def test_data_dir_is_the_mounted_volume_and_one_writer_uses_it():
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    data = volumes[mounts[config()["APTSERVE_DATA_DIR"]]]
    claim = one("PersistentVolumeClaim")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # SQLite (WAL) is safe for one process on one host only: until the PostgreSQL job store, one pod at a time.
    assert "APTSERVE_DATABASE_URL" not in config()
    assert one("ScaledObject")["spec"]["maxReplicaCount"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_pod_is_locked_down_and_gets_a_gpu():
    pod = one("Deployment")["spec"]["template"]["spec"]
    main = container()
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's
    assert main["securityContext"]["readOnlyRootFilesystem"] and not main["securityContext"]["allowPrivilegeEscalation"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    writable = {mount["mountPath"] for mount in main["volumeMounts"]}
    assert {"/tmp", "/home/aptserve"} <= writable, "torch and Triton write caches under /tmp and $HOME"


def test_shutdown_drains_within_the_grace_period():
    pod = one("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = int(command[1])
    assert 5 <= drain <= 30
    assert pod["terminationGracePeriodSeconds"] >= float(config()["APTSERVE_REQUEST_TIMEOUT_S"]) + drain
