"""Triton flash-attention kernels against the fp32 reference. Without a GPU they run under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported (triton.jit reads it when it decorates, and triton's own
tl.max/tl.sum are decorated at import), and other modules import triton first in a normal pytest run. So on CPU,
unless the whole run was started with TRITON_INTERPRET=1, `test_kernels_under_interpreter` reruns this file in a
child pytest with the variable set and the kernel tests here skip: nothing leaks into other modules.

Tolerances (max abs error vs `reference_attention` on fp32 copies of the inputs):
- fp16/bf16: kernel error <= 2x the error of plain torch in the same dtype + a floor of one ulp of the output
  scale (eps(dtype) * max|ref|), because the interpreter's fp32 -> fp16/bf16 casts do not round to nearest even.
- FP8: relative Frobenius error <= 6e-2, and <= 1.1x a torch emulation of the same quantisation (dequantised
  Q/K/V, P rounded to e4m3, fp32 math). e4m3's 3 mantissa bits alone put the error near 4.7% on random normals
  (measured 4.7-5.0% here), so a 3e-2 bound cannot hold for any e4m3 Q/K/V scheme.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aptserve import kernels
from aptserve.kernels import triton_attention as module
from aptserve.kernels import triton_fp8
from aptserve.kernels.attention import choose_attention_impl
from aptserve.kernels.fp8 import E4M3_MAX, FP8_DTYPE, dequantize, quantize_fp8_blockwise, quantize_fp8_rows
from aptserve.kernels.triton_attention import FP8_BLOCK, triton_attention, triton_attention_fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_KERNELS = module.HAS_TRITON and (DEVICE == "cuda" or module.INTERPRETED)
FP8_REL_TOL = 6e-2

needs_kernels = pytest.mark.skipif(
    not RUNS_KERNELS, reason="runs in the TRITON_INTERPRET=1 child of test_kernels_under_interpreter"
)


@pytest.mark.skipif(RUNS_KERNELS or not module.HAS_TRITON, reason="kernels run in this process")
def test_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@pytest.fixture(params=["tma", "pointers"])
def loads(request, monkeypatch):
    """Both ways the kernel loads Q/K/V tiles: TMA tensor descriptors (Hopper; the interpreter runs them too) and
    plain pointer loads (older GPUs, or layouts TMA cannot address)."""
    monkeypatch.setattr(module, "USE_TMA", request.param == "tma")
    return request.param


def make_qkv(b, h, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device=DEVICE, dtype=dtype) for n in (nq, nk, nk)]


def make_mask(kind, b, nk):
    """None, "half" (batch 0 keeps its first third, like padded text), or "most" (batch 0 keeps 2 keys)."""
    if kind is None:
        return None
    mask = torch.ones(b, nk, dtype=torch.bool)
    if kind == "half":
        mask[0, max(1, nk // 3) :] = False
    else:
        mask[0, 1:-1] = False
        mask[1, 1::2] = False
    return mask.to(DEVICE)


def poison_masked_values(v, mask):
    """Large values under masked keys: any leak of a masked key shows up in the output."""
    if mask is not None:
        v = v.masked_fill(~mask[:, None, :, None], 300.0)
    return v


def reference(q, k, v, mask):
    return kernels.reference_attention(q.float(), k.float(), v.float(), mask)


def plain_torch(q, k, v, mask):
    """The same math as the reference, every step in q's dtype: the error budget the kernel is held to."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def max_err(out, ref):
    return (out.float() - ref).abs().max().item()


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@needs_kernels
@pytest.mark.parametrize("mask_kind", [None, "half", "most"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(("nq", "nk"), [(1, 17), (17, 130), (67, 67), (130, 1)])
def test_error_within_2x_plain_torch(nq, nk, d, dtype, mask_kind, loads):
    q, k, v = make_qkv(2, 2, nq, nk, d, dtype)
    mask = make_mask(mask_kind, 2, nk)
    v = poison_masked_values(v, mask)
    ref = reference(q, k, v, mask)
    out = triton_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    err, plain = max_err(out, ref), max_err(plain_torch(q, k, v, mask), ref)
    floor = torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= 2 * plain + floor, f"kernel {err:.2e} vs plain torch {plain:.2e} (floor {floor:.2e})"


@needs_kernels
def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = make_qkv(2, 2, 17, 67, 64, torch.bfloat16)
    mask = torch.ones(2, 67, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    for op in (triton_attention, triton_attention_fp8):
        out = op(q, k, v, mask)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all()


@needs_kernels
def test_non_contiguous_inputs_match_contiguous(loads):
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(1, 2, 33, 67, 64, torch.float16))
    assert not q.is_contiguous()
    out = triton_attention(q, k, v)
    torch.testing.assert_close(out, triton_attention(q.contiguous(), k.contiguous(), v.contiguous()))


@needs_kernels
@pytest.mark.parametrize("op", [triton_attention, triton_attention_fp8])
@pytest.mark.parametrize(("nq", "nk", "d"), [(17, 130, 64), (130, 67, 128)])
def test_tma_and_pointer_loads_agree(op, nq, nk, d, monkeypatch):
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(2, 3, nq, nk, d, torch.bfloat16))
    mask = make_mask("most", 2, nk)
    assert module._tma_usable(q, k, v) == (DEVICE == "cpu" or torch.cuda.get_device_capability() >= (9, 0))
    out_tma = op(q, k, v, mask)
    monkeypatch.setattr(module, "USE_TMA", False)
    out_pointers = op(q, k, v, mask)
    if DEVICE == "cpu":  # the same arithmetic on the same values, whichever way they were loaded
        assert torch.equal(out_tma, out_pointers)
    else:
        torch.testing.assert_close(out_tma, out_pointers, rtol=1e-2, atol=1e-2)


@needs_kernels
def test_layouts_tma_cannot_address_take_pointer_loads():
    q, k, v = make_qkv(1, 2, 33, 67, 64, torch.bfloat16)
    assert module._tma_usable(q, k, v) == (DEVICE == "cpu" or torch.cuda.get_device_capability() >= (9, 0))
    wide = torch.randn(1, 2, 33, 65, dtype=torch.bfloat16, device=DEVICE)
    shifted = wide[..., 1:]  # base 2 bytes past a 16-byte boundary and rows of 130 bytes: no descriptor fits
    assert not module._tma_usable(shifted, k, v)
    torch.testing.assert_close(triton_attention(shifted, k, v), triton_attention(shifted.contiguous(), k, v))


def fp8_emulated(q, k, v, mask):
    """Torch emulation of the FP8 kernel's numerics: dequantised Q/K/V, P rounded to e4m3, fp32 math."""
    dq, dk, dv = (dequantize(*quantize_fp8_blockwise(x, FP8_BLOCK), FP8_BLOCK) for x in (q, k, v))
    scores = dq @ dk.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = (scores - scores.amax(-1, keepdim=True)).exp()
    p8 = (p * E4M3_MAX).to(FP8_DTYPE).float() / E4M3_MAX
    return (p8 @ dv) / p.sum(-1, keepdim=True)


@needs_kernels
@pytest.mark.parametrize("mask_kind", [None, "half"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("nq", "nk", "d"), [(17, 130, 64), (130, 67, 128)])
def test_fp8_relative_error(nq, nk, d, dtype, mask_kind, loads):
    q, k, v = make_qkv(2, 2, nq, nk, d, dtype, seed=1)
    mask = make_mask(mask_kind, 2, nk)
    ref = reference(q, k, v, mask)
    out = triton_attention_fp8(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    err, emulated = rel_err(out, ref), rel_err(fp8_emulated(q.float(), k.float(), v.float(), mask), ref)
    message = f"fp8 relative error {err:.4f} (torch emulation {emulated:.4f}, bound {FP8_REL_TOL})"
    assert err <= FP8_REL_TOL and err <= 1.1 * emulated, message


@pytest.mark.skipif(
    DEVICE != "cuda" or not module.HAS_TRITON, reason="the GPU's e4m3 MMA accumulation; CPU dots are exact"
)
def test_fp8_error_holds_over_long_sequences_with_a_mean_in_v(loads):
    """Thousands of keys and V with a mean: a running P @ V sum grows large, and an e4m3 MMA that adds into it with
    fewer bits than fp32 would swamp later tiles (the in-place accumulation measured 33% through the apt-8b DiT)."""
    q, k, v = make_qkv(1, 2, 256, 8192, 128, torch.bfloat16, seed=2)
    v = v + 2.0
    ref = reference(q, k, v, None)
    err = rel_err(triton_attention_fp8(q, k, v), ref)
    emulated = rel_err(fp8_emulated(q.float(), k.float(), v.float(), None), ref)
    # Here the error is small (0.26% against the emulation's 0.19% on an H200): P is quantised against the running
    # row max rather than the final one, and sums run in another order. Swamping would be ten times the emulation.
    assert err <= 2 * emulated, f"fp8 relative error {err:.4f} (emulation {emulated:.4f})"


@pytest.mark.skipif(not module.HAS_TRITON, reason="needs triton")
def test_autotuner_tries_every_tile_only_on_large_problems():
    configs = module._hopper_configs()
    assert len(configs) == len(module._HOPPER_TILES) > 1
    assert module._prune_configs(configs, {"N_Q": 47056, "N_K": 47056}) == configs
    assert module._prune_configs(configs, {"N_Q": 130, "N_K": 67}) == configs[:1]
    assert module._prune_configs(configs, {"N_Q": 1, "N_K": (1 << 22) - 1}) == configs[:1]


def test_fp8_blockwise_quantisation_round_trip():
    x = torch.randn(2, 3, 130, 64) * torch.logspace(-3, 2, 130)[:, None]  # blocks of very different magnitude
    x[0, 0, :FP8_BLOCK] = 0.0  # an all-zero block must not produce NaN
    x8, scales = quantize_fp8_blockwise(x, FP8_BLOCK)
    assert x8.dtype == FP8_DTYPE and scales.shape == (2, 3, 2)
    back = dequantize(x8, scales, FP8_BLOCK)
    per_token = scales.repeat_interleave(FP8_BLOCK, -1)[..., :130, None]
    # Half an ulp of e4m3 is 2^-4 relative for normals; subnormals are spaced 2^-9 in scaled units.
    assert ((back - x).abs() <= x.abs() * 2**-4 + per_token * 2**-10).all()
    assert (back[0, 0, :FP8_BLOCK] == 0).all()
    assert x8[1].float().abs().amax().item() == E4M3_MAX


def assert_same_bits(actual: tuple, expected: tuple) -> None:
    (y, s), (y_ref, s_ref) = actual, expected
    assert y.dtype == FP8_DTYPE and y.shape == y_ref.shape and y.is_contiguous()
    assert torch.equal(s, s_ref), (s - s_ref).abs().max()
    different = (y.view(torch.uint8) != y_ref.view(torch.uint8)).sum().item()
    assert different == 0, f"{different} of {y.numel()} e4m3 values differ"


@needs_kernels
@pytest.mark.parametrize(
    ("shape", "dtype", "block"),
    [((2, 3, 130, 64), torch.bfloat16, FP8_BLOCK), ((1, 2, 67, 128), torch.float16, FP8_BLOCK),
     ((2, 1, 33, 64), torch.float32, 16)],
)  # fmt: skip
def test_triton_block_quantisation_is_bit_identical_to_torch(shape, dtype, block):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 3, shape[2])[:, None]  # blocks far apart in magnitude
    x[0, 0, :block] = 0.0  # an all-zero block: the floor scale, zeros out
    x = x.to(device=DEVICE, dtype=dtype)
    assert_same_bits(triton_fp8.quantize_fp8_blocks(x, block), quantize_fp8_blockwise(x, block))
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) storage, as the DiT's heads are
    assert_same_bits(triton_fp8.quantize_fp8_blocks(strided, block), quantize_fp8_blockwise(x, block))


@needs_kernels
@pytest.mark.parametrize(("m", "k"), [(77, 3072), (5, 80)])
def test_triton_row_quantisation_is_bit_identical_to_torch(m, k):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(4)) * 7).to(device=DEVICE, dtype=torch.bfloat16)
    y, s = triton_fp8.quantize_fp8_blocks(x[None, None], 1)
    assert_same_bits((y.view(m, k), s.view(m, 1)), quantize_fp8_rows(x))
    assert_same_bits(triton_fp8.quantize_rows(x), quantize_fp8_rows(x))  # the dispatcher (kernel on CUDA only)


def test_triton_quantisation_says_what_it_cannot_run():
    x = torch.randn(1, 1, 8, 64)
    reason = triton_fp8.unsupported_reason
    if not triton_fp8.HAS_TRITON:
        assert reason(x, 128) == "triton is not installed"
        return
    assert "power of two" in reason(x.to(DEVICE), 96)
    assert "does not fit" in reason(x.to(DEVICE), 1024)
    assert "dtype" in reason(x.to(DEVICE).to(torch.int32), 128)
    with pytest.raises(ValueError, match="expected x"):
        triton_fp8.quantize_fp8_blocks(x[0], 128)


@needs_kernels
def test_quantisation_op_passes_opcheck():
    x = torch.randn(1, 2, 20, 64, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(torch.ops.aptserve.quantize_fp8_blocks.default, (x, 16))


@needs_kernels
@pytest.mark.parametrize("impl", ["triton", "triton_fp8"])
def test_custom_op_under_torch_compile(impl):
    q, k, v = make_qkv(1, 2, 17, 33, 64, torch.bfloat16)
    mask = make_mask("half", 1, 33)

    def block(q, k, v, mask):
        return kernels.attention(q * 1.5, k, v, mask, impl=impl) + 1.0

    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), block(q, k, v, mask))


@needs_kernels
@pytest.mark.parametrize("op", ["flash_attention", "flash_attention_fp8"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(op, with_mask):
    q, k, v = make_qkv(1, 1, 17, 20, 64, torch.float16)
    mask = make_mask("half", 1, 20) if with_mask else None
    torch.library.opcheck(getattr(torch.ops.aptserve, op).default, (q, k, v, mask))


def test_auto_never_picks_triton_on_cpu():
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    assert choose_attention_impl("auto", q) == "sdpa"
    assert choose_attention_impl("auto", q.float()) == "sdpa"


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda_but_never_fp8():
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda")
    assert choose_attention_impl("auto", q) == "triton"
    assert choose_attention_impl("auto", q[..., :32]) == "sdpa"
    assert choose_attention_impl("auto", q.float()) == "sdpa"


@pytest.mark.skipif(not module.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("impl", ["triton", "triton_fp8"])
def test_explicit_triton_rejects_what_it_cannot_run(impl, monkeypatch):
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype torch\.float32"):
        choose_attention_impl(impl, q.float())
    with pytest.raises(ValueError, match="head dim 32"):
        choose_attention_impl(impl, q[..., :32])
    with pytest.raises(ValueError, match="device meta"):
        choose_attention_impl(impl, q.to("meta"))
    with pytest.raises(ValueError, match=r"dtype torch\.float32"):
        kernels.attention(q.float(), q.float(), q.float(), impl=impl)
    monkeypatch.setattr(module, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_attention_impl(impl, q)


def test_without_triton_auto_falls_back_and_explicit_triton_says_why(monkeypatch):
    monkeypatch.setattr(module, "HAS_TRITON", False)
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    assert choose_attention_impl("auto", q) == "sdpa"
    with pytest.raises(ValueError, match="triton is not installed"):
        choose_attention_impl("triton", q)


@pytest.mark.parametrize("op", [triton_attention, triton_attention_fp8])
def test_public_functions_check_their_inputs(op):
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        op(q, q, q, torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="share dtype"):
        op(q, q.half(), q.half())
    with pytest.raises(ValueError, match="expected q"):
        op(q[0], q, q)
