"""Analytic FLOP counts (2 per multiply-add) for one generator forward at a given video shape.

Used to turn benchmark times into TFLOP/s. Tests cross-check it against torch's FlopCounterMode on real modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from aptserve.engines.config import ModelConfig
from aptserve.engines.dit import DiTConfig, token_grid
from aptserve.engines.wan import MOD_ROWS, WanConfig


@dataclass(frozen=True)
class FlopCount:
    linear: float
    attention: float
    video_tokens: int
    text_tokens: int

    @property
    def total(self) -> float:
        return self.linear + self.attention


def latent_shape(config: ModelConfig, frames: int, width: int, height: int) -> tuple[int, int, int]:
    """(F, H, W) of the latent for a clip of `frames` frames at width x height."""
    return config.vae.latents_for_frames(frames), height // 8, width // 8


def dit_flops(config: ModelConfig, frames: int, width: int, height: int, text_tokens: int | None = None) -> FlopCount:
    """FLOPs of one generator forward (one denoising step) for one sample. `text_tokens` defaults to the text
    encoder's max_length for our MMDiT and to `text_len` for Wan (which always attends to all of them)."""
    latent = latent_shape(config, frames, width, height)
    if isinstance(config.dit, WanConfig):
        return wan_flops(config.dit, latent, text_tokens)
    return mmdit_flops(config.dit, latent, config.text.max_length if text_tokens is None else text_tokens)


def mmdit_flops(config: DiTConfig, latent: tuple[int, int, int], text_tokens: int) -> FlopCount:
    """Our dual-stream MMDiT on a latent of (F, H, W); the per-sample modulation MLPs are left out (tiny)."""
    nt, nv = text_tokens, _video_tokens(latent, config.patch_size)
    d, hidden = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    # Dual stream: a token passes only its own stream's weights, so a video token sees about half the parameters.
    full_stream = 4 * d * d + 2 * d * hidden  # qkv + out + MLP, multiply-adds per token
    per_block = (nv + nt) * full_stream
    last_block = nv * full_stream + nt * 2 * d * d  # the last block's text stream only feeds k and v
    embed = nv * config.patch_dim * d * 2 + nt * config.text_dim * d  # video in + out, text in
    linear = 2 * ((config.depth - 1) * per_block + last_block + embed)
    n = nt + nv
    attention = 4 * d * n * ((config.depth - 1) * n + nv)  # QK^T and PV; the last block has video queries only
    return FlopCount(float(linear), float(attention), nv, nt)


def wan_flops(config: WanConfig, latent: tuple[int, int, int], text_tokens: int | None = None) -> FlopCount:
    """Wan2.1's single-stream generator on a latent of (F, H, W). Text is zero-padded to `text_len` and never
    masked, so every block's cross-attention sees all `text_len` tokens whatever the prompt's length."""
    nt = config.text_len if text_tokens is None else text_tokens
    nv, d = _video_tokens(latent, config.patch_size), config.hidden_size
    # per block: self-attention qkv + out, cross-attention q + out, MLP over video; cross k, v over text
    per_block = nv * (4 * d * d + 2 * d * d + 2 * d * config.ffn_dim) + nt * 2 * d * d
    patch = config.in_channels * config.patch_volume
    embed = nv * patch * d + nt * (config.text_dim * d + d * d) + nv * d * config.patch_volume * config.out_channels
    time = config.freq_dim * d + d * d + d * MOD_ROWS * d  # per sample: time MLP and the shared modulation
    linear = 2 * (config.depth * per_block + embed + time)
    attention = 4 * d * nv * (nv + nt) * config.depth  # QK^T and PV: self-attention, then cross to the text
    return FlopCount(float(linear), float(attention), nv, nt)


def _video_tokens(latent: tuple[int, int, int], patch_size: tuple[int, int, int]) -> int:
    gf, gh, gw = token_grid(latent, patch_size)
    return gf * gh * gw
