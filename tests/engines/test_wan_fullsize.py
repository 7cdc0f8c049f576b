"""The key maps at full size, on the meta device (no memory, no download): diffusers' Wan2.1 T2V 1.3B and 14B
transformers and AutoencoderKLWan, built from their published configs, map onto our modules with every tensor used
once and every shape and parameter count equal to the published ones."""

import pytest
import torch

from aptserve.engines.vae import VAE_PRESETS, CausalVAE
from aptserve.engines.wan import WAN_PRESETS, WanTransformer, diffusers_to_ours
from aptserve.engines.wan_vae import diffusers_vae_to_ours

diffusers = pytest.importorskip("diffusers", reason="diffusers builds the published Wan2.1 modules to map from")

# transformer/config.json of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers (diffusers' convert_wan_to_diffusers.py)
WAN21_T2V_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "added_kv_proj_dim": None,
}
WAN21_T2V_14B = WAN21_T2V_1_3B | {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}

# Separate q/k/v fuse into one tensor (3 -> 1) and cross-attention k/v into one (2 -> 1), weight and bias each.
FEWER_TENSORS_PER_BLOCK = 2 * 2 + 2 * 1


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def numel(state: dict[str, torch.Tensor]) -> int:
    return sum(value.numel() for value in state.values())


@pytest.mark.parametrize(
    ("preset", "published", "parameters"),
    [("wan2.1-1.3b", WAN21_T2V_1_3B, 1_418_996_800), ("wan2.1-14b", WAN21_T2V_14B, 14_288_491_584)],
    ids=["1.3b", "14b"],
)
def test_transformer_key_map_at_full_size(preset, published, parameters):
    with torch.device("meta"):
        theirs = diffusers.WanTransformer3DModel(**published)
        ours = WanTransformer(WAN_PRESETS[preset])
    state = theirs.state_dict()
    mapped = diffusers_to_ours(state)  # raises on an unmapped key, a slice filled twice or an incomplete fusion
    expected = ours.state_dict()
    assert set(mapped) == set(expected)
    assert shapes(mapped) == shapes(expected)
    assert len(state) - len(mapped) == FEWER_TENSORS_PER_BLOCK * published["num_layers"]
    assert numel(state) == numel(mapped) == numel(expected) == parameters
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == parameters


def test_vae_key_map_at_full_size():
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKLWan()  # the default config is Wan2.1's VAE
        ours = CausalVAE(VAE_PRESETS["wan2.1"])
    state = theirs.state_dict()
    mapped = diffusers_vae_to_ours(state)  # a rename plus reshapes: one tensor out per tensor in
    expected = ours.state_dict()
    assert len(mapped) == len(state) == 194
    assert set(mapped) == set(expected)
    assert shapes(mapped) == shapes(expected)
    assert numel(state) == numel(mapped) == numel(expected) == 126_892_531
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == 126_892_531
