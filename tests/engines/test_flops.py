"""The analytic FLOP counts of engines/flops.py: published-size values and a cross-check against torch's
FlopCounterMode on real forwards (attention through the "reference" impl, whose explicit matmuls the counter sees)."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aptserve.engines.config import MODEL_PRESETS
from aptserve.engines.dit import MMDiT
from aptserve.engines.flops import dit_flops, wan_flops
from aptserve.engines.vae import VAE_PRESETS
from aptserve.engines.wan import WAN_PRESETS, WanTransformer


def counted_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    model.attention_impl = "reference"  # explicit matmuls, which the counter sees (CPU SDPA is not registered)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def test_apt_8b_flops_at_720p():
    flops = dit_flops(MODEL_PRESETS["apt-8b"], frames=49, width=1280, height=720)
    assert flops.video_tokens == 46_800
    # Attention ~0.97 PFLOP. Linears ~0.38 PFLOP, not 2 * 8.2e9 params * 46,800 tokens = 0.77: in a dual-stream
    # MMDiT a video token passes only the video stream's half of the weights.
    assert 0.95e15 <= flops.attention <= 0.99e15
    assert 0.37e15 <= flops.linear <= 0.39e15
    assert 1.32e15 <= flops.total <= 1.38e15, flops


def test_flop_formula_matches_torch_flop_counter():
    config = MODEL_PRESETS["tiny"]
    x = torch.randn(1, 16, 13, 8, 8)
    text, mask = torch.randn(1, 32, 384), torch.ones(1, 32, dtype=torch.bool)
    counted = counted_flops(MMDiT(config.dit).eval(), x, torch.ones(1), text, mask)
    expected = dit_flops(config, frames=49, width=64, height=64).total
    # The analytic count ignores the per-sample modulation MLPs; they are tiny next to the token work.
    assert abs(counted - expected) / expected < 0.01, (counted, expected)


def test_wan_1_3b_flops_at_832x480x81():
    # Wan2.1 1.3B at 832x480x81: latent 21x60x104, 32,760 video + 512 text tokens. Per step and sample (CFG runs
    # two): 82.09 TFLOP of linears + 200.91 TFLOP of attention = 283.00 TFLOP. Linears are ~2 * 1.25e9 * 32,760:
    # of the 1.42B parameters, the cross-attention k/v (141.6M) and the text embedding see only the 512 text tokens.
    config = SimpleNamespace(dit=WAN_PRESETS["wan2.1-1.3b"], vae=VAE_PRESETS["wan2.1"])  # dit_flops reads only these
    flops = dit_flops(config, frames=81, width=832, height=480)
    assert (flops.video_tokens, flops.text_tokens) == (32_760, 512)
    assert flops == wan_flops(WAN_PRESETS["wan2.1-1.3b"], (21, 60, 104))
    assert flops.linear == pytest.approx(82.0947e12, rel=1e-5)
    assert flops.attention == pytest.approx(200.9071e12, rel=1e-5)
    assert flops.total == pytest.approx(283.0018e12, rel=1e-5)
    # text_tokens overrides the padded length (only an experiment would: Wan always attends to all 512)
    assert dit_flops(config, frames=81, width=832, height=480, text_tokens=256).total < flops.total


@pytest.mark.parametrize("latent", [(3, 4, 6), (5, 8, 2)])
def test_wan_flop_formula_matches_torch_flop_counter(latent):
    config = WAN_PRESETS["wan-tiny"]
    model = WanTransformer(config).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, *latent, generator=g)
    text, mask = torch.randn(2, 5, config.text_dim, generator=g), torch.ones(2, 5, dtype=torch.bool)
    counted = counted_flops(model, x, torch.rand(2, generator=g), text, mask)
    # Every matmul, conv and attention product is in the formula (time MLP and modulation included), and the
    # counter skips elementwise work as the formula does: equal up to float rounding. The formula is per sample.
    assert counted == pytest.approx(2 * wan_flops(config, latent).total, rel=1e-9)
