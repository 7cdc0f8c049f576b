"""Tests for the causal video VAE: shapes, streaming decode == whole decode, causality, explicit cache, sizes."""

import pytest
import torch

from aptserve.engines.vae import VAE_PRESETS, CausalVAE, DecodeCache, VAEConfig, _conv3d

# Small enough to run in milliseconds, but with every optional part switched on and a distinct decoder width.
SMALL = VAEConfig(
    base_channels=4,
    channel_mults=(1, 2, 2, 2),
    num_res_blocks=1,
    decoder_base_channels=6,
    decoder_res_blocks=2,
    mid_attention=True,
    latent_mean=0.1,
    latent_std=1.5,
)


def _randomized(config: VAEConfig, seed: int = 0) -> CausalVAE:
    """A model whose zero-initialised parts (attention output, biases) are not zero, so no path hides a bug."""
    torch.manual_seed(seed)
    model = CausalVAE(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model() -> CausalVAE:
    return _randomized(SMALL)


def _video(frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1  # (B, 3, F, H, W)


def _latent(latents: int, size: int = 2, seed: int = 2, channels: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, channels, latents, size, size, generator=g)  # (B, 16, L, h, w)


def _chunked(model: CausalVAE, latent: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.decode_chunks(latent))


# ----------------------------------------------------------------------------------------------------------------------
# Shapes and config


@torch.no_grad()
@pytest.mark.parametrize(("frames", "latents"), [(49, 13), (1, 1), (5, 2)])
def test_round_trip_shapes(model: CausalVAE, frames: int, latents: int) -> None:
    z = model.encode(_video(frames))
    assert z.shape == (1, 16, latents, 2, 2)
    assert model.decode(z).shape == (1, 3, frames, 16, 16)


def test_frame_latent_arithmetic() -> None:
    assert SMALL.frames_for_latents(13) == 49
    assert SMALL.latents_for_frames(49) == 13
    assert (SMALL.spatial_factor, SMALL.temporal_factor) == (8, 4)
    with pytest.raises(ValueError, match="48"):
        SMALL.latents_for_frames(48)
    with pytest.raises(ValueError, match="0"):
        SMALL.frames_for_latents(0)


@torch.no_grad()
def test_bad_inputs_raise(model: CausalVAE) -> None:
    with pytest.raises(ValueError, match="48"):
        model.encode(_video(48))
    with pytest.raises(ValueError, match="12x12"):
        model.encode(_video(5, size=12))
    with pytest.raises(ValueError, match="latent must be"):
        model.decode(_latent(3, channels=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_channels": 0}, "base_channels must be >= 1, got 0"),
        ({"channel_mults": (1, 2, 4)}, r"channel_mults .* got \(1, 2, 4\)"),
        ({"channel_mults": (1, 0, 4, 4)}, r"got \(1, 0, 4, 4\)"),
        ({"decoder_res_blocks": -1}, "decoder_res_blocks must be >= 1, got -1"),
        ({"latent_std": 0.0}, "latent_std must be > 0, got 0.0"),
        ({"latent_std": (1.0,) * 15 + (0.0,)}, "latent_std must be > 0"),
        ({"latent_mean": (0.0, 1.0)}, r"latent_mean must be one number or one per latent channel \(16\), got 2"),
        ({"first_frames_mean": ((0.0,) * 16,)}, "first_frames_mean and first_frames_std must cover the same frames"),
        ({"first_frames_mean": ((0.0,) * 15,), "first_frames_std": ((1.0,) * 15,)}, r"one value per latent channel"),
        ({"first_frames_mean": ((0.0,) * 16,), "first_frames_std": ((1.0,) * 15 + (0.0,),)}, "first_frames_std must"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**kwargs)


@torch.no_grad()
def test_encode_normalises_and_samples(model: CausalVAE) -> None:
    video = _video(5)
    mean, logvar = model.encode_distribution(video)
    assert logvar.shape == mean.shape
    torch.testing.assert_close(model.encode(video), (mean - 0.1) / 1.5)
    a = model.encode(video, generator=torch.Generator().manual_seed(3))
    b = model.encode(video, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, model.encode(video))


@torch.no_grad()
def test_per_channel_statistics_normalise_each_channel(model: CausalVAE) -> None:
    means = tuple(0.1 * c for c in range(16))
    stds = tuple(0.5 + 0.25 * c for c in range(16))
    per_channel = CausalVAE(VAEConfig(**{**SMALL.__dict__, "latent_mean": means, "latent_std": stds})).eval()
    per_channel.load_state_dict(model.state_dict())
    video = _video(5)
    mean, _ = model.encode_distribution(video)
    z = per_channel.encode(video)
    for c in (0, 7, 15):
        torch.testing.assert_close(z[:, c], (mean[:, c] - means[c]) / stds[c])
    # decode undoes the per-channel scaling: the decoder sees the same raw latents as the scalar model's
    torch.testing.assert_close(per_channel.decode(z), model.decode(model.encode(video)), atol=1e-5, rtol=1e-5)


def _first_frames_apart(model: CausalVAE, frames: int = 2) -> tuple[CausalVAE, list[list[float]], list[list[float]]]:
    """`model`'s weights with per-channel statistics and the first `frames` latent frames normalised apart."""
    head_mean = [[0.05 * (c - k) for c in range(16)] for k in range(frames)]
    head_std = [[0.2 + 0.1 * k + 0.01 * c for c in range(16)] for k in range(frames)]  # lists: as JSON loads them
    config = VAEConfig(
        **{
            **SMALL.__dict__,
            "latent_mean": tuple(0.1 * c for c in range(16)),
            "latent_std": tuple(0.5 + 0.25 * c for c in range(16)),
            "first_frames_mean": head_mean,
            "first_frames_std": head_std,
        }
    )
    assert isinstance(config.first_frames_std[1], tuple) and len(config.normalisation) == 4
    apart = CausalVAE(config).eval()
    apart.load_state_dict(model.state_dict())
    return apart, head_mean, head_std


@torch.no_grad()
def test_first_latent_frames_normalised_apart(model: CausalVAE) -> None:
    apart, head_mean, head_std = _first_frames_apart(model)
    video = _video(13)  # 4 latent frames: two with their own statistics, two with the channels'
    mean, _ = model.encode_distribution(video)
    z = apart.encode(video)
    for c in (0, 9):
        for k in (0, 1):
            torch.testing.assert_close(z[:, c, k], (mean[:, c, k] - head_mean[k][c]) / head_std[k][c])
        torch.testing.assert_close(z[:, c, 2:], (mean[:, c, 2:] - 0.1 * c) / (0.5 + 0.25 * c))
    # decode undoes it, whole or streamed one latent frame at a time (each chunk knows its frame index)
    reference = model.decode(model.encode(video))
    torch.testing.assert_close(apart.decode(z), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(_chunked(apart, z), dim=2), reference, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Streaming decode


def test_chunked_decode_matches_whole(model: CausalVAE) -> None:
    latent = _latent(13)
    chunks = _chunked(model, latent)
    assert [c.shape[2] for c in chunks] == [1] + [4] * 12
    with torch.no_grad():
        whole = model.decode(latent)
    assert (torch.cat(chunks, dim=2) - whole).abs().max().item() < 1e-5


def test_chunked_decode_matches_whole_tiny_preset() -> None:
    # 64x64 frames: the chunks take the time-last conv route on CPU, the whole decode does not.
    model = _randomized(VAE_PRESETS["tiny"])
    latent = _latent(4, size=8)
    with torch.no_grad():
        whole = model.decode(latent)
    assert whole.shape == (1, 3, 13, 64, 64)
    assert (torch.cat(_chunked(model, latent), dim=2) - whole).abs().max().item() < 1e-5


def test_multi_frame_chunks_match_whole(model: CausalVAE) -> None:
    latent = _latent(6)
    cache = model.init_decode_cache()
    with torch.no_grad():
        first, cache = model.decode_chunk(latent[:, :, :2], cache)
        rest, cache = model.decode_chunk(latent[:, :, 2:], cache)
        whole = model.decode(latent)
    assert (first.shape[2], rest.shape[2], cache.latent_frames_decoded) == (5, 16, 6)
    assert (torch.cat([first, rest], dim=2) - whole).abs().max().item() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("shape", [(1, 16, 6, 64, 64), (1, 8, 3, 32, 48), (2, 16, 6, 64, 64)])
def test_time_last_conv_matches_conv3d(shape: tuple[int, ...]) -> None:
    conv = torch.nn.Conv3d(shape[1], 5, (3, 3, 3), padding=(0, 1, 1))
    x = torch.randn(shape)
    torch.testing.assert_close(_conv3d(conv, x), conv(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Causality


@torch.no_grad()
def test_decoder_is_causal(model: CausalVAE) -> None:
    latent = _latent(5)
    whole = model.decode(latent)
    for j in range(4):  # latents 0..j make frames 0..4j
        changed = latent.clone()
        changed[:, :, j + 1 :] = torch.randn_like(changed[:, :, j + 1 :])
        kept = SMALL.frames_for_latents(j + 1)
        out = model.decode(changed)
        assert (out[:, :, :kept] - whole[:, :, :kept]).abs().max().item() < 1e-6
        assert (out[:, :, kept:] - whole[:, :, kept:]).abs().max().item() > 1e-3


@torch.no_grad()
def test_encoder_is_causal(model: CausalVAE) -> None:
    video = _video(17)
    whole = model.encode(video)
    for j in range(4):  # latent j sees frames 0..4j only
        kept = SMALL.frames_for_latents(j + 1)
        changed = video.clone()
        changed[:, :, kept:] = torch.rand_like(changed[:, :, kept:]) * 2 - 1
        out = model.encode(changed)
        assert (out[:, :, : j + 1] - whole[:, :, : j + 1]).abs().max().item() < 1e-6
        assert (out[:, :, j + 1 :] - whole[:, :, j + 1 :]).abs().max().item() > 1e-4


@torch.no_grad()
def test_encoder_streams_with_a_cache(model: CausalVAE) -> None:
    # The encoder threads the same cache: frame 0 alone, then 4 frames per latent, equals the whole pass.
    video = _video(13)
    whole, _ = model.encoder(video)
    cache: dict = {}
    pieces = []
    for start, stop in [(0, 1), (1, 5), (5, 9), (9, 13)]:
        piece, cache = model.encoder(video[:, :, start:stop], cache)
        pieces.append(piece)
    assert [p.shape[2] for p in pieces] == [1, 1, 1, 1]
    assert (torch.cat(pieces, dim=2) - whole).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# The cache is explicit and the module stateless


@torch.no_grad()
def test_fresh_caches_give_identical_output(model: CausalVAE) -> None:
    latent = _latent(3)
    assert all(torch.equal(a, b) for a, b in zip(_chunked(model, latent), _chunked(model, latent)))


@torch.no_grad()
def test_module_keeps_no_state_between_sequences(model: CausalVAE) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _chunked(model, _latent(4, seed=7))
    b_after_a = _chunked(model, _latent(3, seed=8))
    model_b = _randomized(SMALL)  # same seed: same weights, never used before
    b_alone = _chunked(model_b, _latent(3, seed=8))
    assert all(torch.equal(x, y) for x, y in zip(b_after_a, b_alone))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(model.buffers()) == []


@torch.no_grad()
def test_cache_is_not_mutated_and_can_be_resumed_twice(model: CausalVAE) -> None:
    latent = _latent(3)
    _, cache = model.decode_chunk(latent[:, :, :1], model.init_decode_cache())
    snapshot = {k: v.clone() for k, v in cache.convs.items()}
    a, next_a = model.decode_chunk(latent[:, :, 1:2], cache)
    b, next_b = model.decode_chunk(latent[:, :, 1:2], cache)
    assert torch.equal(a, b)
    assert snapshot.keys() == cache.convs.keys()
    assert all(torch.equal(snapshot[k], v) for k, v in cache.convs.items())
    assert (cache.latent_frames_decoded, next_a.latent_frames_decoded) == (1, 2)
    assert isinstance(next_b, DecodeCache) and next_b.convs is not cache.convs


# ----------------------------------------------------------------------------------------------------------------------
# Sizes


def _param_counts(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = CausalVAE(VAE_PRESETS[name])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(model.encoder), count(model.decoder)


def test_wan_preset_is_wan_sized() -> None:
    encoder, decoder = _param_counts("wan")
    assert 100e6 < encoder + decoder < 170e6  # Wan2.1's VAE has about 127M
    light_encoder, light_decoder = _param_counts("wan-light")
    assert light_encoder == encoder
    assert light_decoder < 0.5 * decoder


def test_presets_are_valid() -> None:
    assert set(VAE_PRESETS) >= {"tiny", "wan", "wan-light"}
    assert VAE_PRESETS["wan-light"].decoder_channels == (256, 256, 128, 64)
    assert not VAE_PRESETS["tiny"].mid_attention
