"""8-bit attention in SageAttention2's scheme, in plain torch: the quantisation both paths share, and an fp32 emulation
of the Triton kernel (`kernels.triton_int8`) that CPU evaluation and serving use where the kernel cannot run.

The scheme, per (batch, head):
- K is smoothed: its mean over the real keys is subtracted from every key. That adds the same q.mean to each score of a
  query row, which softmax cancels, and masked keys score -inf whatever they hold, so the result is unchanged; it takes
  the large per-channel offsets of K out of the int8 range, leaving the spread between keys.
- Q and K go to int8 with one scale per token (amax / 127, round to nearest even): Q.K^T is an exact int32 dot, and
  a few outlier tokens cannot coarsen their neighbours' grid the way one scale per block of tokens would.
- V is smoothed too: out = P (V - mean) / sum(P) + mean is the same value because the softmax weights sum to one, and
  it keeps a mean in V (as through the DiT) out of the e4m3 rounding of P and V. V then goes to e4m3 with one scale
  per channel (amax / 448), which factors out of P @ V and is applied once at the end.
- P (the softmax numerator, in [0, 1]) is multiplied by 448 and rounded to e4m3; the row sum uses the unrounded P.
Padded keys and values are zeroed before any of this: their scores are masked anyway, and garbage in them (text
padding) must not move a mean or a scale. A batch with no real key gets zero means and comes out as zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from aptserve.kernels.fp8 import _MIN_AMAX, E4M3_MAX, FP8_DTYPE

INT8_MAX = 127.0
# Query rows per step of the emulation: bounds its fp32 score matrix to about 2^26 values whatever the lengths.
_EMULATION_SCORES = 1 << 26


class SageInputs(NamedTuple):
    """Quantised attention inputs; `q`/`k`/`v` times their scales (plus `v_mean`) give back the smoothed inputs."""

    q: torch.Tensor  # (B, H, Nq, D) int8
    q_scale: torch.Tensor  # (B, H, Nq) fp32, one per query token
    k: torch.Tensor  # (B, H, Nk, D) int8, mean-subtracted; zero at padded keys
    k_scale: torch.Tensor  # (B, H, Nk) fp32, one per key token
    v: torch.Tensor  # (B, H, Nk, D) e4m3, mean-subtracted; zero at padded keys
    v_scale: torch.Tensor  # (B, H, D) fp32, one per channel
    v_mean: torch.Tensor  # (B, H, D) fp32, added back to the output


def quantize_int8_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N, D) -> int8 values and fp32 scales (..., N), one per token: x ~= x_int8 * scale[..., None]."""
    scale = x.abs().amax(-1).clamp(min=_MIN_AMAX) * (1.0 / INT8_MAX)
    x_int8 = torch.round(x / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x_int8, scale


def _real_key_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of (B, H, Nk, D) fp32 x (`real` is (B, 1, Nk, 1) float); zero if there are none."""
    return (x * real).sum(2) / real.sum(2).clamp(min=1.0)  # (B, H, D)


def quantize_sage(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> SageInputs:
    """Smooth and quantise (B, H, N, D) q, k, v as the module docstring says; `key_padding_mask` is (B, Nk), True where
    a key is real."""
    B, _, Nk, _ = k.shape
    real = torch.ones(B, 1, Nk, 1, device=k.device) if key_padding_mask is None else key_padding_mask[:, None, :, None]
    real = real.float()
    k, v = k.float(), v.float()
    k_smooth = (k - _real_key_mean(k, real)[:, :, None]) * real  # (B, H, Nk, D)
    v_mean = _real_key_mean(v, real)  # (B, H, D)
    v_smooth = (v - v_mean[:, :, None]) * real
    v_scale = v_smooth.abs().amax(2).clamp(min=_MIN_AMAX) * (1.0 / E4M3_MAX)  # (B, H, D)
    v_fp8 = (v_smooth / v_scale[:, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    q_int8, q_scale = quantize_int8_tokens(q.float())
    k_int8, k_scale = quantize_int8_tokens(k_smooth)
    return SageInputs(q_int8, q_scale, k_int8, k_scale, v_fp8, v_scale, v_mean)


def _emulate_rows(x: SageInputs, rows: slice, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    q_int8, q_scale = x.q[:, :, rows], x.q_scale[:, :, rows]
    # Integer products summed over D <= 1024 stay below 2^24: this fp32 matmul is the kernel's exact int32 dot.
    dots = q_int8.float() @ x.k.float().transpose(-1, -2)  # (B, H, rows, Nk)
    scores = dots * x.k_scale[:, :, None, :] * (q_scale * x.q.shape[-1] ** -0.5)[..., None]
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    # A finite floor keeps rows without a real key NaN-free: their P is zero, and so is their output.
    row_max = scores.amax(-1, keepdim=True).clamp(min=-1e30)
    p = (scores - row_max).exp()
    p_fp8 = (p * E4M3_MAX).to(FP8_DTYPE).float()  # P scaled to e4m3's range; the scale cancels in the division below
    pv = p_fp8 @ x.v.float()  # e4m3 products are exact in fp32; the sums round as the kernel's fp32 accumulator does
    row_sum = p.sum(-1, keepdim=True).clamp(min=1e-30) * E4M3_MAX
    return pv * (x.v_scale[:, :, None] / row_sum) + x.v_mean[:, :, None]


def sage_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over real keys with the 8-bit kernel's quantisation, computed in fp32 torch.

    Emulates `triton_attention_int8`: the same int8 Q/K and e4m3 V bits, P rounded to e4m3 against each row's final
    max (the kernel rounds against the running max, tile by tile, so the two differ by rounding). Any head dim and
    device; output in q's dtype; rows with no real key are zeros.
    """
    x = quantize_sage(q, k, v, key_padding_mask)
    B, H, Nq, _ = q.shape
    step = max(1, _EMULATION_SCORES // max(1, B * H * k.shape[2]))
    chunks = [_emulate_rows(x, slice(start, start + step), key_padding_mask) for start in range(0, Nq, step)]
    return torch.cat(chunks, dim=2).to(q.dtype)
