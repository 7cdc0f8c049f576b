"""Analytic FLOP counts (2 per multiply-add) for one generator forward at a given video shape.

Used to turn benchmark times into TFLOP/s. Tests cross-check it against torch's FlopCounterMode on real modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from aptserve.engines.config import ModelConfig


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
    """FLOPs of one generator forward (one denoising step) for one sample."""
    dit = config.dit
    nt = config.text.max_length if text_tokens is None else text_tokens
    lf, lh, lw = latent_shape(config, frames, width, height)
    pf, ph, pw = dit.patch_size
    nv = (lf // pf) * (lh // ph) * (lw // pw)
    d, hidden = dit.hidden_size, int(dit.hidden_size * dit.mlp_ratio)
    # Dual stream: a token passes only its own stream's weights, so a video token sees about half the parameters.
    full_stream = 4 * d * d + 2 * d * hidden  # qkv + out + MLP, multiply-adds per token
    per_block = (nv + nt) * full_stream
    last_block = nv * full_stream + nt * 2 * d * d  # the last block's text stream only feeds k and v
    embed = nv * dit.patch_dim * d * 2 + nt * dit.text_dim * d  # video in + out, text in
    linear = 2 * ((dit.depth - 1) * per_block + last_block + embed)
    n = nt + nv
    attention = 4 * d * n * ((dit.depth - 1) * n + nv)  # QK^T and PV; the last block has video queries only
    return FlopCount(float(linear), float(attention), nv, nt)
