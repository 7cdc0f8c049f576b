"""bench/gpu_check.py --tiny runs the whole one-shot GPU check on the CPU: every row is measured or says why not."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The rows docs/PERF.md reports, in table order.
EXPECTED_ROWS = [
    "matmul",
    "attention sdpa",
    "attention triton",
    "attention triton_fp8",
    "attention triton_int8",
    "dit eager sdpa",
    "dit eager triton",
    "dit eager fp8 linears",
    "dit eager fp8 linears + fp8 attention",
    "dit eager fp8 linears + int8 attention",
    "dit compiled fp8 linears",
    "vae wan chunked",
    "vae wan channels-last chunked",
    "vae wan compiled chunked",
    "vae wan-light chunked",
    "vae wan-light channels-last compiled chunked",
    "e2e eager fast path",
    "e2e compiled fast path",
    "served fast path",
    "wan2.1 eager sdpa",
    "wan2.1 eager triton",
    "wan2.1 eager fp8 linears",
    "wan2.1 compiled fp8 linears",
    "wan2.1 vae chunked",
    "peak memory",
]
NEEDS_CUDA = {
    "attention triton",
    "attention triton_fp8",
    "attention triton_int8",
    "dit eager triton",
    "dit eager fp8 linears + fp8 attention",
    "wan2.1 eager triton",
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_tiny_gpu_check_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    # One thread: on a shared 2-core machine two OpenMP threads can be 10x slower than one.
    cmd = [sys.executable, "bench/gpu_check.py", "--tiny", "--threads", "1", "--budget-s", "600", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| row | seconds | TFLOP/s |" in result.stdout

    data = json.loads(out.read_text())
    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == EXPECTED_ROWS
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch"]
    for name, row in rows.items():
        if name in NEEDS_CUDA:
            assert row["status"] == "skipped" and "needs CUDA" in row["reason"], row
        else:
            assert row["status"] == "ok", row
            assert any(_number(row[key]) for key in ("seconds", "peak_gib")), row

    assert _number(rows["matmul"]["tflops"]) and _number(rows["dit eager sdpa"]["peak_fraction"])
    assert rows["attention sdpa"]["error"] < 1e-5  # fp32 SDPA against the fp32 reference
    assert 1e-3 < rows["dit eager fp8 linears"]["error"] < 4e-2  # the FP8 emulation really ran
    assert "int8_emulated" in rows["dit eager fp8 linears + int8 attention"]["note"]
    assert rows["dit eager fp8 linears + int8 attention"]["error"] < 4e-2
    assert "fMP4 encoder" in rows["served fast path"]["note"]  # the worker's path, encoder included
    for name in ("vae wan channels-last chunked", "vae wan compiled chunked"):
        assert rows[name]["error"] < 1e-5, name  # fp32: layouts and compilation agree with the eager decode

    # Wan2.1 rows at wan-tiny: 64x64x49 is 208 video tokens, text always padded to its text_len of 16
    assert _number(rows["wan2.1 eager sdpa"]["tflops"]) and "208 + 16 tokens" in rows["wan2.1 eager sdpa"]["note"]
    for name in ("wan2.1 eager fp8 linears", "wan2.1 compiled fp8 linears"):
        assert 1e-3 < rows[name]["error"] < 4e-2, name  # the FP8 emulation ran, against the eager sdpa step
        # 7 linears in each of the 2 blocks; WAN_SKIP keeps the embeddings, modulation and final layer out
        assert "14 FP8 linears" in rows[name]["note"], rows[name]
    assert "latent 13x8x8" in rows["wan2.1 vae chunked"]["note"]
