"""FP8 (e4m3) quantisation in one pass, in Triton: the fast path of `kernels.fp8`'s quantisers on CUDA.

The plain-torch quantisers read the input about ten times over (fp32 copy, padding, abs, amax, divide, clamp, cast);
this kernel reads each block once into registers, takes its amax there and writes e4m3 bytes and one fp32 scale.
The results are bit-identical to the torch references (same fp32 amax, correctly rounded division, clamp, and a
round-to-nearest-even cast), which the tests check under the interpreter and on a GPU.

One program quantises one block: `block` consecutive tokens of one (batch, head) of a (B, H, N, D) tensor, all D
values of each. Per-token scales for linears are the same thing with block = 1 on an (M, K) matrix seen as
(1, 1, M, K).
"""

from __future__ import annotations

import contextlib

import torch

from aptserve.kernels._triton import HAS_TRITON, INTERPRETED, round_to_e4m3, tl, triton
from aptserve.kernels._triton import jit as _jit
from aptserve.kernels.fp8 import _MIN_AMAX, E4M3_MAX, FP8_DTYPE, quantize_fp8_blockwise, quantize_fp8_rows

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Registers hold one whole block; beyond this many values per program (e.g. 128 tokens x D = 256) it would spill.
MAX_BLOCK_VALUES = 1 << 15


@_jit
def _quantize_blocks_kernel(
    X, Y, S,
    stride_xb, stride_xh, stride_xn, stride_xd,
    H, N, D, N_BLOCKS,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr,
    INTERPRETER: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    inside = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    x_ptrs = X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.maximum(amax, MIN_AMAX) * (1.0 / FP8_MAX)
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if INTERPRETER:  # its fp8 cast truncates
        y = round_to_e4m3(y)
    y_ptrs = Y + bh * N * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(S + bh * N_BLOCKS + blk, scale)


def unsupported_reason(x: torch.Tensor, block: int) -> str | None:
    """Why the kernel cannot quantise tensors like `x` in blocks of `block` tokens, or None if it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} is not supported (float16, bfloat16 or float32)"
    if block < 1 or block & (block - 1):
        return f"block must be a power of two; got {block}"
    if block * triton.next_power_of_2(x.shape[-1]) > MAX_BLOCK_VALUES:
        return f"a block of {block} x {x.shape[-1]} values does not fit one program ({MAX_BLOCK_VALUES} at most)"
    if x.device.type == "cpu" and not INTERPRETED:
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    if x.device.type not in ("cpu", "cuda"):
        return f"device {x.device} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"
    return None


def _output_shapes(x: torch.Tensor, block: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    B, H, N, _ = x.shape
    return tuple(x.shape), (B, H, -(-N // block))


@torch.library.custom_op("aptserve::quantize_fp8_blocks", mutates_args=())
def _quantize_fp8_blocks_op(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 4:
        raise ValueError(f"expected x (B, H, N, D); got {tuple(x.shape)}")
    reason = unsupported_reason(x, block)
    if reason is not None:
        raise ValueError(f"triton fp8 quantisation cannot run: {reason}")
    y_shape, s_shape = _output_shapes(x, block)
    y = torch.empty(y_shape, device=x.device, dtype=FP8_DTYPE)
    scales = torch.empty(s_shape, device=x.device, dtype=torch.float32)
    B, H, N, D = x.shape
    if x.numel():
        meta = {
            "BLOCK": block,
            "D_PAD": triton.next_power_of_2(D),
            "MIN_AMAX": _MIN_AMAX,
            "FP8_MAX": E4M3_MAX,
            "INTERPRETER": INTERPRETED,
        }
        grid = (s_shape[2], B * H)
        warps = 8 if block * meta["D_PAD"] >= 8192 else 4
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _quantize_blocks_kernel[grid](x, y, scales, *x.stride(), H, N, D, s_shape[2], **meta, num_warps=warps)
    return y, scales


@_quantize_fp8_blocks_op.register_fake
def _(x, block):
    y_shape, s_shape = _output_shapes(x, block)
    return x.new_empty(y_shape, dtype=FP8_DTYPE), x.new_empty(s_shape, dtype=torch.float32)


def quantize_fp8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) -> contiguous e4m3 values and fp32 scales (B, H, ceil(N / block)), as the torch reference."""
    return torch.ops.aptserve.quantize_fp8_blocks(x, block)


def _fast(x: torch.Tensor, block: int) -> bool:
    """The kernel is the fast path on CUDA only; under the interpreter it is exercised explicitly by the tests."""
    return x.is_cuda and not INTERPRETED and unsupported_reason(x, block) is None


def quantize_blockwise(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.fp8.quantize_fp8_blockwise`, in one pass on CUDA."""
    return quantize_fp8_blocks(x, block) if _fast(x, block) else quantize_fp8_blockwise(x, block)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.fp8.quantize_fp8_rows` ((M, K) -> e4m3 (M, K), scales (M, 1)), in one pass on CUDA."""
    if not (x.dim() == 2 and _fast(x, 1)):
        return quantize_fp8_rows(x)
    y, scales = quantize_fp8_blocks(x[None, None], 1)
    return y.view(x.shape), scales.view(-1, 1)
