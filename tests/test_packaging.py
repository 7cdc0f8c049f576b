"""One import package: `aptserve` is the only top-level name we install, PyPI packages with generic names (Hugging
Face's `kernels`) resolve to site-packages, and the layering between subpackages is a checked contract."""

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_aptserve_is_the_only_top_level_package():
    dist = importlib.metadata.distribution("aptserve")
    assert dist.read_text("top_level.txt").split() == ["aptserve"]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["aptserve"], f"top-level import packages in the checkout: {packages}"


GENERIC_NAMES = ("engines", "server", "training", "evaluation", "media", "kernels")


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_generic_names_never_resolve_to_our_code(where, tmp_path):
    """As a user's `python` sees them (its working directory first on the path), from the checkout and outside."""
    code = (
        "import importlib.util, json; "
        f"print(json.dumps({{n: getattr(importlib.util.find_spec(n), 'origin', None) for n in {GENERIC_NAMES!r}}}))"
    )
    cwd = ROOT if where == "repository root" else tmp_path
    found = json.loads(subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, check=True).stdout)
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    ours = {n: o for n, o in found.items() if o and Path(o).is_relative_to(ROOT) and not Path(o).is_relative_to(site)}
    assert ours == {}, ours
    assert found["kernels"], "Hugging Face's kernels (a transformers dependency) is not installed"


def test_hugging_face_kernels_resolves_to_site_packages():
    """transformers >= 5.25 imports Hugging Face's `kernels`; nothing of ours may shadow it."""
    import kernels
    import transformers.integrations.hub_kernels  # noqa: F401

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(kernels.__file__).resolve().is_relative_to(site), kernels.__file__


def test_no_sys_path_patches():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    patched = [
        name
        for name in tracked.stdout.split()
        if any(f"sys.path.{verb}(" in (ROOT / name).read_text() for verb in ("insert", "append"))
    ]
    assert patched == [], patched


def test_engines_and_kernels_import_without_the_server_stack():
    code = (
        "import sys, aptserve.engines.pipeline, aptserve.engines.flops, aptserve.kernels; "
        "bad = [m for m in ('fastapi', 'uvicorn', 'aptserve.server', 'prometheus_client', 'aptserve.training') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_layering_contract_holds():
    """cli -> server | training (evaluation above training) -> engines | media -> kernels; nothing imports upward."""
    exe = shutil.which("lint-imports", path=str(BIN))
    assert exe, "import-linter is not installed in this environment"
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_console_script_and_module_entry_point():
    exe = shutil.which("aptserve", path=str(BIN))
    assert exe, "the aptserve console script is not installed in this environment"
    for cmd in ([exe, "--help"], [sys.executable, "-m", "aptserve", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert all(name in out for name in ("serve", "generate", "train", "eval", "analyze")), out


# Accelerator libraries imported only behind a capability check: torch's CUDA build brings triton, TensorRT is
# installed by hand where it exists (aptserve.engines.backends.tensorrt); onnx comes with the `export` extra
# (aptserve export onnx), imported where the export runs; psycopg with the `postgres` extra, imported only when a
# database URL is set.
OPTIONAL_IMPORTS = {"triton", "tensorrt", "onnx", "psycopg"}


def third_party_imports(folder: Path) -> set[str]:
    import ast

    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("aptserve", "__future__")}


@pytest.mark.parametrize(("folder", "extra"), [("aptserve", None), ("tests", "dev"), ("bench", "dev")])
def test_every_third_party_import_is_a_declared_dependency(folder, extra):
    from packaging.requirements import Requirement

    declared = set()
    for line in importlib.metadata.distribution("aptserve").requires:
        req = Requirement(line)
        if req.marker is None or (extra and req.marker.evaluate({"extra": extra})):
            declared.add(req.name.lower().replace("_", "-"))
    providers = importlib.metadata.packages_distributions()
    local = {p.stem for p in (ROOT / folder).glob("*.py")} | {"tests", "harness"}
    missing = {}
    for name in sorted(third_party_imports(ROOT / folder) - OPTIONAL_IMPORTS - local):
        dists = {d.lower().replace("_", "-") for d in providers.get(name, [name])}
        if not dists & declared:
            missing[name] = sorted(dists)
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"
