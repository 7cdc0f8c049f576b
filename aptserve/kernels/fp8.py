"""FP8 (e4m3) quantisation in plain torch: per (batch, head, block of tokens) scales for attention inputs, per-row
scales for linear layers. These are the references; `kernels.triton_fp8` computes the same bits in one pass on CUDA.

Scales map each block's amax to E4M3_MAX, so `x ~= dequantize(*quantize_fp8_blockwise(x, block), block)`.
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# An all-zero block would give a zero scale and 0/0 on quantisation; any positive scale encodes zeros exactly.
_MIN_AMAX = 1e-12


def quantize_fp8_blockwise(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise (B, H, N, D) to e4m3 with one fp32 scale per `block` tokens; returns (x_fp8, scales (B, H, nblocks))."""
    if x.dim() != 4 or block < 1:
        raise ValueError(f"expected x (B, H, N, D) and block >= 1; got {tuple(x.shape)} and block {block}")
    B, H, N, D = x.shape
    nblocks = -(-N // block)
    padded = F.pad(x.float(), (0, 0, 0, nblocks * block - N))  # (B, H, nblocks * block, D)
    amax = padded.view(B, H, nblocks, block * D).abs().amax(-1)  # (B, H, nblocks)
    scales = amax.clamp(min=_MIN_AMAX) * (1.0 / E4M3_MAX)
    x_fp8 = (x.float() / _per_token(scales, block, N)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return x_fp8, scales


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 values (M, K) and fp32 scales (M, 1), one scale per row: x ~= x_fp8 * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # (M, 1)
    scale = amax.clamp(min=_MIN_AMAX) * (1.0 / E4M3_MAX)
    x_fp8 = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return x_fp8, scale


def dequantize(x_fp8: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `quantize_fp8_blockwise`, in fp32: (B, H, N, D)."""
    return x_fp8.float() * _per_token(scales, block, x_fp8.shape[2])


def _per_token(scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(block, dim=-1)[..., :n, None]  # (B, H, N, 1)
