"""FP8 linears against fp32: stated error bounds, per-token scales, and a quantised tiny MMDiT end to end (CPU emulation).

e4m3 keeps 3 mantissa bits, so each operand carries about 2-3% RMS rounding error; with per-channel weight scales and
per-token activation scales a random matmul measures about 3.7% relative (Frobenius) error, against 0.3% for bf16.
"""

import copy

import pytest
import torch
from torch import nn

from aptserve.engines.dit import DIT_PRESETS, MMDiT
from aptserve.engines.quant import DIT_SKIP, FP8Linear, quantize_model, quantize_rows, quantized_layer_names
from aptserve.kernels.fp8 import FP8_DTYPE

FP8_LINEAR_BOUND = 5e-2  # measured 3.6-3.7% on the shapes below
FP8_DIT_BOUND = 4e-2  # measured 1.5% (tiny preset, random weights, bf16 model vs the same model quantised)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@torch.no_grad()
@pytest.mark.parametrize(("k", "n", "m"), [(256, 768, 64), (1024, 256, 33), (48, 80, 1), (40, 24, 7)])
def test_fp8_linear_matches_fp32_within_bound(k: int, n: int, m: int) -> None:
    linear = _linear(k, n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    fp8, ref = FP8Linear.from_linear(linear)(x), linear(x)
    bf16 = nn.functional.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16())
    err, bf16_err = _rel(fp8, ref), _rel(bf16, ref)
    assert err < FP8_LINEAR_BOUND, f"FP8 linear relative error {err:.4f} >= {FP8_LINEAR_BOUND} (bf16: {bf16_err:.4f})"
    assert err > bf16_err, "the emulation must carry FP8 rounding, not fp32 or bf16"


@torch.no_grad()
def test_per_token_scales_keep_relative_error_across_magnitudes() -> None:
    linear = _linear(256, 128, bias=False)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    x[3] *= 1e3
    x[5] *= 1e-3  # a per-tensor scale would flush this row to zero
    out, ref = layer(x), linear(x)
    errors = [_rel(out[i], ref[i]) for i in range(8)]
    assert max(errors) < FP8_LINEAR_BOUND, f"per-row relative errors {errors}"
    assert abs(errors[3] - _rel(layer(x[:1] * 1e3), linear(x[:1] * 1e3))) < 2e-2, "scaled row lost precision"


def test_quantize_rows_round_trips_and_handles_zero_rows() -> None:
    x = torch.randn(4, 64)
    x[2] = 0.0
    x_fp8, scale = quantize_rows(x)
    assert x_fp8.dtype == FP8_DTYPE and scale.shape == (4, 1) and scale.dtype == torch.float32
    back = x_fp8.float() * scale
    assert torch.all(back[2] == 0) and _rel(back, x) < 4e-2
    assert torch.allclose(x_fp8.float().abs().amax(-1)[[0, 1, 3]], torch.tensor(448.0))


@torch.no_grad()
def test_fp8_linear_storage_survives_dtype_casts() -> None:
    layer = FP8Linear.from_linear(_linear(64, 32))
    x = torch.randn(5, 64).bfloat16()
    before = layer(x.float())
    layer.to(torch.bfloat16)  # would cast e4m3 values to bf16 without their scales if stored as a float tensor
    assert layer.weight_e4m3.dtype == FP8_DTYPE and layer.weight_bits.dtype == torch.uint8
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    after = layer(x)
    assert after.dtype == torch.bfloat16 and _rel(after, before) < 1e-2  # bf16 bias and output rounding only
    with pytest.raises(ValueError, match="64"):
        layer(torch.randn(2, 63))


@torch.no_grad()
def test_fp8_linear_keeps_leading_dims_and_no_bias() -> None:
    linear = _linear(32, 16, bias=False)
    x = torch.randn(2, 3, 32)
    out = FP8Linear.from_linear(linear)(x)
    assert out.shape == (2, 3, 16) and _rel(out, linear(x)) < FP8_LINEAR_BOUND


# ----------------------------------------------------------------------------------------------------------------------
# The whole tiny MMDiT


def _tiny_dit() -> MMDiT:
    model = MMDiT(DIT_PRESETS["tiny"]).eval()
    model.init_weights(torch.Generator().manual_seed(0), zero_out=False)
    return model


def _dit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 5, 8, 8, generator=g)
    text = torch.randn(1, 32, 384, generator=g)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, 20:] = False
    return x, torch.ones(1), text, mask


@torch.no_grad()
def test_quantize_model_skips_embeddings_modulation_and_final_layer() -> None:
    model = _tiny_dit()
    count = quantize_model(model)
    names = quantized_layer_names(model)
    assert count == len(names) == 5 * 8 + 5  # 8 linears per block, 5 in the last (context_pre_only) one
    assert not [n for n in names if any(n == s or n.startswith(s + ".") for s in DIT_SKIP)]
    for name in ("video_embed", "text_embed", "time_embed.0", "time_embed.2", "pooled_text_embed.0"):
        assert type(model.get_submodule(name)) is nn.Linear, name
    for name in ("shared_mod.1", "final_mod.1", "final_proj"):
        assert type(model.get_submodule(name)) is nn.Linear, name
    assert "blocks.0.video_mlp.fc1" in names and "blocks.5.text_in.qkv" in names
    assert quantize_model(model) == 0  # already quantised layers are not nn.Linear any more


@torch.no_grad()
def test_quantized_tiny_dit_stays_close_to_bf16() -> None:
    model = _tiny_dit()
    x, t, text, mask = _dit_inputs()
    ref = model(x, t, text, mask)  # fp32
    bf16 = copy.deepcopy(model).bfloat16()
    out_bf16 = bf16(x.bfloat16(), t, text.bfloat16(), mask)
    quantize_model(bf16)
    out_fp8 = bf16(x.bfloat16(), t, text.bfloat16(), mask)
    err, err_ref, bf16_err = _rel(out_fp8, out_bf16), _rel(out_fp8, ref), _rel(out_bf16, ref)
    assert err < FP8_DIT_BOUND, f"FP8 DiT vs bf16: {err:.4f} (vs fp32 {err_ref:.4f}; bf16 vs fp32 {bf16_err:.4f})"
    # The blocks must matter to the output, or the bound above would say nothing about the quantised layers.
    model.blocks = nn.ModuleList()
    assert _rel(model(x, t, text, mask), ref) > 0.1


@torch.no_grad()
def test_fp8_linear_runs_under_torch_compile() -> None:
    layer = FP8Linear.from_linear(_linear(64, 32))
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(layer, dynamic=False)  # inductor: the uint8 -> e4m3 view and casts must lower
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@torch.no_grad()
def test_scaled_mm_path_matches_emulation_on_cuda() -> None:
    linear = _linear(256, 384).cuda().bfloat16()
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(77, 256, device="cuda", dtype=torch.bfloat16)
    if not layer._can_use_scaled_mm(x):
        pytest.skip("row-wise torch._scaled_mm needs compute capability 9.0")
    fast, emulated = layer(x), layer._emulated(x).bfloat16()
    assert _rel(fast, emulated) < 1e-2  # same quantised operands; only accumulation order and bf16 output differ
    assert _rel(fast, linear.float()(x.float())) < FP8_LINEAR_BOUND
