"""WanTransformer against diffusers' WanTransformer3DModel (a test-only oracle) at a tiny random config, plus the
published parameter counts, FP8 linears through RunOptions and one torch.compile call.

Measured on CPU (torch 2.13, diffusers 0.42.1): in fp32 the outputs (scale 2-4) are bit-identical, also on a
5x16x24 token grid; in bf16 our max abs error against the fp32 oracle is 0.0146 vs diffusers' own 0.0151 (ratio 0.97).
"""

import copy

import pytest
import torch

from aptserve.engines.backends.options import RunOptions
from aptserve.engines.quant import FP8Linear, quantized_layer_names
from aptserve.engines.wan import WAN_PRESETS, WAN_SKIP, WanConfig, WanTransformer, diffusers_to_ours

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle for the Wan2.1 port")

TINY = WAN_PRESETS["wan-tiny"]
FP32_ATOL = 1e-5
BF16_RATIO = 2.0  # our bf16 error at most 2x diffusers' own, both against diffusers in fp32
FP8_BOUND = 5e-2  # relative (Frobenius) error of FP8 linears against the same model in fp32


def diffusers_transformer(config: WanConfig = TINY):
    """diffusers' WanTransformer3DModel with `config`'s shape, at its own initial values."""
    return diffusers.WanTransformer3DModel(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.depth,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=config.eps,
    ).eval()


def diffusers_model(config: WanConfig = TINY, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers_transformer(config)
    with torch.no_grad():  # move every norm weight, bias and table off its default value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def our_copy(reference) -> WanTransformer:
    model = WanTransformer(TINY)
    model.load_state_dict(diffusers_to_ours(reference.state_dict()), strict=True)
    return model.eval()


def inputs(seed: int = 0, lengths: tuple[int, int] = (5, 9)):
    """Latents, two prompts of unequal length (our text/mask, with garbage in the padding) and diffusers' text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, TINY.in_channels, 3, 4, 6, generator=g)
    text = torch.randn(2, max(lengths), TINY.text_dim, generator=g)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # (B, L)
    padded = torch.zeros(2, TINY.text_len, TINY.text_dim)  # what Wan's pipeline feeds: real tokens, then zeros
    for i, n in enumerate(lengths):
        padded[i, :n] = text[i, :n]
    text[~mask] = 100.0  # must not matter
    return x, text, mask, padded


def run_diffusers(model, x, t, padded) -> torch.Tensor:
    return model(hidden_states=x, timestep=1000.0 * t, encoder_hidden_states=padded, return_dict=False)[0]


def as_bf16_diffusers(model):
    """diffusers' bf16 as from_pretrained(torch_dtype=bfloat16) builds it: `_keep_in_fp32_modules` stay fp32."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():  # buffers (the RoPE tables) stay fp32 too
        if not any(part in model._keep_in_fp32_modules for part in name.split(".")):
            p.data = p.data.bfloat16()
    return model


def test_presets_match_the_published_parameter_counts():
    counts = {}
    for name in ("wan2.1-1.3b", "wan2.1-14b"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in WanTransformer(WAN_PRESETS[name]).parameters())
    assert counts == {"wan2.1-1.3b": 1_418_996_800, "wan2.1-14b": 14_288_491_584}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_heads", 5, "not divisible"),
        ("num_heads", 8, "too small"),
        ("ffn_dim", 0, ">= 1"),
        ("freq_dim", 33, "even"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    kwargs = {"depth": 2, "hidden_size": 64, "num_heads": 4, "ffn_dim": 128, field: value}
    with pytest.raises(ValueError, match=message):
        WanConfig(**kwargs)


def test_key_map_uses_every_tensor_once_and_rejects_strays():
    reference = diffusers_model()
    state = reference.state_dict()
    mapped = diffusers_to_ours(state)
    ours = WanTransformer(TINY).state_dict()
    assert set(mapped) == set(ours)
    assert sum(v.numel() for v in mapped.values()) == sum(v.numel() for v in state.values())
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    with pytest.raises(KeyError, match="no mapping"):
        diffusers_to_ours({**state, "blocks.0.attn2.add_k_proj.weight": torch.zeros(1)})
    missing_v = {k: v for k, v in state.items() if k != "blocks.1.attn1.to_v.weight"}
    with pytest.raises(ValueError, match="needs 3 slices"):
        diffusers_to_ours(missing_v)


@torch.no_grad()
def test_matches_diffusers_in_fp32_at_three_timesteps():
    reference = diffusers_model()
    ours = our_copy(reference)
    x, text, mask, padded = inputs()
    for t in (torch.tensor([1.0, 1.0]), torch.tensor([0.625, 0.5]), torch.tensor([0.03, 0.25])):
        expected = run_diffusers(reference, x, t, padded)
        out = ours(x, t, text, mask)
        assert out.shape == x.shape
        torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)


@torch.no_grad()
def test_bf16_error_is_at_most_twice_diffusers_own():
    reference = diffusers_model()
    x, text, mask, padded = inputs(seed=1)
    t = torch.tensor([0.9, 0.4])
    expected = run_diffusers(reference, x, t, padded)
    theirs = run_diffusers(as_bf16_diffusers(reference), x.bfloat16(), t, padded.bfloat16())
    ours = our_copy(reference).to(torch.bfloat16)(x.bfloat16(), t, text.bfloat16(), mask)
    their_err = (theirs.float() - expected).abs().max().item()
    our_err = (ours.float() - expected).abs().max().item()
    assert our_err <= BF16_RATIO * their_err, f"bf16 max abs error: ours {our_err:.4g}, diffusers {their_err:.4g}"


@torch.no_grad()
def test_text_mask_maps_to_zero_padding_and_overlong_text_is_rejected():
    ours = our_copy(diffusers_model())
    x, text, mask, _ = inputs()
    t = torch.tensor([0.5, 0.5])
    full = torch.zeros(2, TINY.text_len, TINY.text_dim)
    full[:, : text.shape[1]] = torch.where(mask[..., None], text, 0.0)
    all_real = torch.ones(2, TINY.text_len, dtype=torch.bool)
    torch.testing.assert_close(ours(x, t, text, mask), ours(x, t, full, all_real), atol=1e-6, rtol=0)
    too_long = torch.zeros(2, TINY.text_len + 1, TINY.text_dim)
    with pytest.raises(ValueError, match="at most"):
        ours(x, t, too_long, torch.ones(too_long.shape[:2], dtype=torch.bool))


@torch.no_grad()
def test_fp8_linears_via_run_options_skip_embeddings_and_final_layer():
    model = our_copy(diffusers_model())
    x, text, mask, _ = inputs()
    t = torch.tensor([0.7, 0.2])
    expected = model(x, t, text, mask)
    RunOptions(fp8_linears=True, fp8_emulation=True).apply(model)
    names = quantized_layer_names(model)
    assert len(names) == 7 * TINY.depth  # qkv, proj; q, kv, proj; fc1, fc2 per block
    assert not any(name.startswith(WAN_SKIP) for name in names)
    assert isinstance(model.blocks[0].self_attn.qkv, FP8Linear)
    out = model(x, t, text, mask)
    err = ((out - expected).norm() / expected.norm()).item()
    assert 0 < err < FP8_BOUND, f"FP8 relative error {err:.4f}"

    kept = our_copy(diffusers_model())  # --bf16-blocks: the named blocks keep every linear out of FP8
    RunOptions(fp8_linears=True, fp8_emulation=True, bf16_blocks=(1,)).apply(kept)
    assert sorted(quantized_layer_names(kept)) == sorted(n for n in names if n.startswith("blocks.0."))


@torch.no_grad()
def test_torch_compile_matches_eager():
    model = our_copy(diffusers_model())
    x, text, mask, _ = inputs()
    t = torch.tensor([0.8, 0.3])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    expected = model(x, t, text, mask)
    torch.testing.assert_close(compiled(x, t, text, mask), expected, atol=1e-5, rtol=1e-5)
    # the served path: the compiled backend compiles each block, as for the MMDiT
    RunOptions(backend="compiled", compiler="aot_eager").apply(model)
    torch.testing.assert_close(model(x, t, text, mask), expected, atol=1e-5, rtol=1e-5)
