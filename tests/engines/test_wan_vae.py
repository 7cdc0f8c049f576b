"""CausalVAE in the "wan2.1" layout against diffusers' AutoencoderKLWan (a test-only oracle) at a tiny random config:
whole decode, streaming decode through our explicit cache, encode, the key map, and the full-size parameter count.

Latent convention: diffusers' `decode` takes raw latents (WanPipeline denormalises first) and `latent_dist.mean` is
raw; our `decode` takes normalised latents (latent * std + mean inside, from the config's per-channel statistics)
and `encode` returns normalised ones. So diffusers is fed `latent * std + mean` computed exactly as we compute it.
"""

import pytest
import torch

from aptserve.engines.vae import VAE_PRESETS, CausalVAE, VAEConfig
from aptserve.engines.wan_vae import diffusers_vae_to_ours

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle for the Wan2.1 VAE port")

FP32_ATOL = 1e-5
LATENT = 4
TINY = VAEConfig(
    layout="wan2.1",
    latent_channels=LATENT,
    base_channels=8,
    num_res_blocks=2,
    decoder_res_blocks=3,
    mid_attention=True,
    latent_mean=(-0.5, 0.25, 1.0, -0.1),
    latent_std=(2.0, 0.5, 1.5, 3.0),
)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(
        base_dim=TINY.base_channels,
        z_dim=LATENT,
        num_res_blocks=TINY.num_res_blocks,
        latents_mean=list(TINY.latent_mean),
        latents_std=list(TINY.latent_std),
    )
    with torch.no_grad():  # move every gamma and bias off its default value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def ours(reference) -> CausalVAE:
    model = CausalVAE(TINY)
    model.load_state_dict(diffusers_vae_to_ours(reference.state_dict(), TINY), strict=True)
    return model.eval()


def _latent(frames: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, LATENT, frames, 2, 3, generator=g)  # (B, C, L, h, w), normalised


def _raw(model: CausalVAE, latent: torch.Tensor) -> torch.Tensor:
    """What diffusers' decode takes: the same denormalisation our decode applies."""
    mean, std = model.config.latent_statistics(latent)
    return latent * std + mean


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_preset_matches_autoencoder_kl_wan_parameter_count():
    with torch.device("meta"):
        ours = sum(p.numel() for p in CausalVAE(VAE_PRESETS["wan2.1"]).parameters())
        theirs = diffusers.AutoencoderKLWan()
    assert ours == sum(p.numel() for p in theirs.parameters()) == 126_892_531
    # the preset carries diffusers' default (Wan2.1's published) latent statistics
    assert VAE_PRESETS["wan2.1"].latent_mean == tuple(theirs.config.latents_mean)
    assert VAE_PRESETS["wan2.1"].latent_std == tuple(theirs.config.latents_std)


def test_key_map_uses_every_tensor_once_and_rejects_strays(reference):
    state = reference.state_dict()
    mapped = diffusers_vae_to_ours(state, TINY)
    ours = CausalVAE(TINY).state_dict()
    assert len(mapped) == len(state) and set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    with pytest.raises(KeyError, match="no mapping"):
        diffusers_vae_to_ours({**state, "encoder.down_blocks.2.avg_shortcut.weight": torch.zeros(1)}, TINY)
    with pytest.raises(ValueError, match="layout"):
        diffusers_vae_to_ours(state, VAE_PRESETS["wan"])


def test_config_rejects_unknown_layout_and_odd_decoder_widths():
    with pytest.raises(ValueError, match="layout"):
        VAEConfig(layout="wan2.2")
    with pytest.raises(ValueError, match="even"):
        VAEConfig(layout="wan2.1", base_channels=3, channel_mults=(1, 1, 1, 1))


@torch.no_grad()
def test_decode_matches_diffusers(reference, ours):
    latent = _latent()
    expected = reference.decode(_raw(ours, latent)).sample
    out = ours.decode(latent)
    assert out.shape == expected.shape == (1, 3, 13, 16, 24)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)


@torch.no_grad()
def test_streaming_decode_matches_whole_decode_and_resumes(reference, ours):
    latent = _latent(seed=2)
    whole = ours.decode(latent)
    cache = ours.init_decode_cache()
    pieces = []
    for t in range(latent.shape[2]):
        piece, cache = ours.decode_chunk(latent[:, :, t : t + 1], cache)
        pieces.append(piece)
        if t == 1:
            kept = cache
    assert [p.shape[2] for p in pieces] == [1, 4, 4, 4]
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, atol=FP32_ATOL, rtol=0)
    for _ in range(2):  # a kept cache resumes the same way more than once
        rest, _ = ours.decode_chunk(latent[:, :, 2:], kept)
        torch.testing.assert_close(rest, whole[:, :, 5:], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(whole, reference.decode(_raw(ours, latent)).sample, atol=FP32_ATOL, rtol=0)


@torch.no_grad()
def test_encode_matches_diffusers(reference, ours):
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 13, 16, 24, generator=g) * 2 - 1
    dist = reference.encode(video).latent_dist
    mean, logvar = ours.encode_distribution(video)
    torch.testing.assert_close(mean, dist.mean, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(logvar, dist.logvar, atol=FP32_ATOL, rtol=0)
    latent_mean, latent_std = ours.config.latent_statistics(mean)
    torch.testing.assert_close(ours.encode(video), (dist.mean - latent_mean) / latent_std, atol=FP32_ATOL, rtol=0)


@torch.no_grad()
def test_torch_compile_streaming_decode_matches_eager(ours):
    latent = _latent(seed=4)
    expected = list(ours.decode_chunks(latent))
    torch._dynamo.reset()
    decoder = ours.decoder
    try:
        ours.decoder = torch.compile(decoder, backend="aot_eager", dynamic=False)
        got = list(ours.decode_chunks(latent))
    finally:
        ours.decoder = decoder
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=FP32_ATOL, rtol=0)
