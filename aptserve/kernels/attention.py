"""Joint text+video attention: one public op, its plain-torch reference, and the one function that picks the impl.

Layout everywhere: q, k, v are (B, H, N, D); `key_padding_mask` is (B, Nk) bool with True where a key is real.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aptserve.kernels.int8 import sage_attention_reference
from aptserve.kernels.triton_attention import INTERPRETED, triton_attention, triton_attention_fp8, unsupported_reason
from aptserve.kernels.triton_int8 import triton_attention_int8

# "triton_int8" is the 8-bit Triton kernel (INT8 Q.K^T, FP8 P.V); "int8_emulated" is the same quantisation in fp32
# torch, for CPUs and GPUs the kernel does not support. Two names, not one that falls back silently: like "triton" and
# "triton_fp8", an impl that was asked for either runs or says why, and a benchmark names the path it measured.
ATTENTION_IMPLS = ("auto", "sdpa", "reference", "triton", "triton_fp8", "triton_int8", "int8_emulated")
_TRITON_IMPLS = ("triton", "triton_fp8", "triton_int8")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q (B,H,Nq,D) and k, v (B,H,Nk,D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be (B, Nk) = {(k.shape[0], k.shape[2])}; got {tuple(key_padding_mask.shape)}"
        )


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention in fp32 with explicit matmuls: the yardstick every kernel is measured against."""
    _check_inputs(q, k, v, key_padding_mask)
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """torch's scaled_dot_product_attention; the fallback that runs everywhere."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def choose_attention_impl(impl: str, q: torch.Tensor) -> str:
    """Resolve `impl` ("auto" included) to a concrete implementation for this device and dtype.

    "auto" takes the Triton kernel on CUDA when it supports q, else SDPA. It never picks an 8-bit impl: they change
    numerics by input-dependent amounts (about 1% relative with a mean in V, 3-5% on zero-mean random inputs, against
    0.2-0.3% for bf16), which is a model-level choice, and the 8-bit kernel's GPU numerics are not yet measured.
    An explicit Triton impl that cannot run raises ValueError saying why (CPU needs TRITON_INTERPRET=1).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}")
    if impl == "auto":
        compiled_triton = q.is_cuda and not INTERPRETED and unsupported_reason(q) is None
        return "triton" if compiled_triton else "sdpa"
    if impl in _TRITON_IMPLS:
        reason = unsupported_reason(q, fp8=impl != "triton")
        if reason is not None:
            raise ValueError(f"attention impl {impl!r} cannot run here: {reason}")
    return impl


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention over (B, H, N, D) tensors with an optional key padding mask; returns (B, H, Nq, D)."""
    _check_inputs(q, k, v, key_padding_mask)
    impl = choose_attention_impl(impl, q)
    if impl == "reference":
        return reference_attention(q, k, v, key_padding_mask)
    if impl == "triton":
        return triton_attention(q, k, v, key_padding_mask)
    if impl == "triton_fp8":
        return triton_attention_fp8(q, k, v, key_padding_mask)
    if impl == "triton_int8":
        return triton_attention_int8(q, k, v, key_padding_mask)
    if impl == "int8_emulated":
        return sage_attention_reference(q, k, v, key_padding_mask)
    return sdpa_attention(q, k, v, key_padding_mask)
