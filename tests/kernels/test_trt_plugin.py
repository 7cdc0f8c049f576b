"""The TensorRT attention plugin's ahead-of-time artifacts, made and checked on the CPU: PTX for sm_90 that assembles
with Triton's bundled ptxas, the kernel name, the argument list TensorRT supplies, the launch parameters; and the
plugin's entry point computing attention, run under the Triton interpreter (in a child process, as TRITON_INTERPRET
must be set before triton is imported). Registering the plugin needs TensorRT, which cannot be installed here: that
test skips with the reason.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the AOT compile uses Triton")
from aptserve.kernels import trt_plugin
from aptserve.kernels._triton import INTERPRETED
from aptserve.kernels.attention import reference_attention

HOPPER_MAX_SHARED = 227 * 1024  # dynamic shared memory one block may opt into on sm_90
needs_compiler = pytest.mark.skipif(INTERPRETED, reason="the AOT compile needs compiled Triton, not TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def kernel() -> trt_plugin.AotKernel:
    if INTERPRETED:
        pytest.skip("the AOT compile needs compiled Triton, not TRITON_INTERPRET=1")
    return trt_plugin.compile_attention("bf16", head_dim=128)


def test_ptx_is_the_named_kernel_for_sm90(kernel) -> None:
    assert kernel.name == "_attn_trt_kernel"
    assert re.search(rf"^\.visible \.entry {kernel.name}\(", kernel.ptx, re.M)
    assert re.search(r"^\.target sm_90a?$", kernel.ptx, re.M)
    version = trt_plugin.PTX_VERSION
    assert re.search(rf"^\.version {version // 10}\.{version % 10}$", kernel.ptx, re.M)


def test_ptx_assembles_for_sm90(kernel, tmp_path) -> None:
    from triton.backends.nvidia.compiler import get_ptxas

    source, cubin = tmp_path / "kernel.ptx", tmp_path / "kernel.cubin"
    source.write_text(kernel.ptx)
    ptxas = get_ptxas(trt_plugin.ARCH).path
    result = subprocess.run([ptxas, "-arch=sm_90a", str(source), "-o", str(cubin)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert cubin.stat().st_size > 0


def test_arguments_are_in_tensorrt_order_without_scratch_pointers(kernel) -> None:
    # inputs, then the int32 extras, then the output: all TensorRT passes, so the PTX entry declares exactly these
    assert trt_plugin.KERNEL_ARGS == ("Q", "K", "V", "MASK", "H", "N_Q", "N_K", "Out")
    assert trt_plugin.EXTRA_ARGS == ("H", "N_Q", "N_K")
    assert len(trt_plugin.PLUGIN_INPUTS) + len(trt_plugin.EXTRA_ARGS) + len(trt_plugin.PLUGIN_OUTPUTS) == 8
    assert kernel.param_types == ("u64",) * 4 + ("u32",) * 3 + ("u64",)


def test_launch_parameters(kernel) -> None:
    plan = trt_plugin.launch_plan(kernel, batch=2, heads=3, n_q=130, n_k=77)
    assert plan.grid == (2, 6, 1)  # ceil(130 / BLOCK_M=128) query tiles x B*H
    assert plan.threads == kernel.num_warps * 32 == trt_plugin.DEFAULT_TILE.num_warps * 32
    assert plan.shared_mem == kernel.shared_mem
    assert 48 * 1024 < kernel.shared_mem <= HOPPER_MAX_SHARED  # above the default 48 KiB: the launch must opt in
    assert plan.extra_args == (3, 130, 77)


def test_only_unreferenced_trailing_params_are_dropped() -> None:
    ptx = (
        ".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n"
        "\t.param .u64 .ptr .global .align 1 k_param_2\n)\n{\n\tld.param.b64 %rd1, [k_param_0];\n}\n"
    )
    dropped = trt_plugin._drop_trailing_params(ptx, "k", keep=2)
    assert trt_plugin.entry_params(dropped, "k") == [("u64", "k_param_0"), ("u32", "k_param_1")]
    with pytest.raises(ValueError, match="k_param_0 is used"):
        trt_plugin._drop_trailing_params(ptx, "k", keep=0)


@needs_compiler
def test_unsupported_dtype_or_head_dim_is_refused() -> None:
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        trt_plugin.compile_attention("fp32", head_dim=128)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        trt_plugin.compile_attention("bf16", head_dim=96)


@needs_compiler
def test_register_plugin_with_tensorrt() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT cannot be installed here: plugin registration is unverified")
    import tensorrt.plugin as trtp

    trt_plugin.register_plugin()
    trt_plugin.register_plugin()  # registers once per process
    assert hasattr(getattr(trtp.op, trt_plugin.PLUGIN_NAMESPACE), trt_plugin.PLUGIN_NAME)


@pytest.mark.skipif(INTERPRETED, reason="this process runs the interpreter test itself")
def test_entry_point_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "matches_reference"]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of test_entry_point_under_interpreter"
)
def test_entry_point_matches_reference() -> None:
    # The plugin's argument order, strides derived from the shapes, mask and constexpr scale, on odd shapes in fp32
    # (the interpreter's low-precision dots are wrong); values under masked keys are poisoned so a leak shows.
    B, H, N_Q, N_K, D = 2, 2, 70, 45, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (N_Q, N_K, N_K))
    mask = torch.ones(B, N_K, dtype=torch.bool)
    mask[0, 20:] = False
    v = v.masked_fill(~mask[:, None, :, None], 300.0)
    out = torch.empty_like(q)
    kernel = trt_plugin.AotKernel("_attn_trt_kernel", "", (), num_warps=4, shared_mem=0, block_m=32)
    plan = trt_plugin.launch_plan(kernel, B, H, N_Q, N_K)
    scale = D**-0.5 * 1.4426950408889634  # log2 units, as compile_attention sets it
    trt_plugin._attn_trt_kernel[plan.grid](
        q, k, v, mask.view(torch.uint8), *plan.extra_args, out, HEAD_DIM=D, BLOCK_M=32, BLOCK_N=32, QK_SCALE=scale
    )
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
