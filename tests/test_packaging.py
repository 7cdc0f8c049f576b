"""The generic package names must resolve to this repository, never to a PyPI package of the same name."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["kernels", "engines", "server", "training"])
def test_packages_resolve_inside_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(ROOT), module.__file__


def test_engines_and_kernels_import_without_the_server_stack():
    code = (
        "import sys, engines.pipeline, engines.flops, kernels; "
        "bad = [m for m in ('fastapi', 'uvicorn', 'server', 'prometheus_client') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_console_script_installed():
    exe = shutil.which("aptserve", path=str(Path(sys.executable).parent))
    assert exe, "the aptserve console script is not installed in this environment"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in out
