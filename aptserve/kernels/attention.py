"""Joint text+video attention: one public op, its plain-torch reference, and the one function that picks the impl.

Layout everywhere: q, k, v are (B, H, N, D); `key_padding_mask` is (B, Nk) bool with True where a key is real.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aptserve.kernels.triton_attention import INTERPRETED, triton_attention, triton_attention_fp8, unsupported_reason

ATTENTION_IMPLS = ("auto", "sdpa", "reference", "triton", "triton_fp8")


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

    "auto" takes the Triton kernel on CUDA when it supports q, else SDPA; it never picks FP8, which changes numerics.
    An explicit "triton"/"triton_fp8" that cannot run raises ValueError saying why (CPU needs TRITON_INTERPRET=1).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}")
    if impl == "auto":
        compiled_triton = q.is_cuda and not INTERPRETED and unsupported_reason(q) is None
        return "triton" if compiled_triton else "sdpa"
    if impl in ("triton", "triton_fp8"):
        reason = unsupported_reason(q, fp8=impl == "triton_fp8")
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
    return sdpa_attention(q, k, v, key_padding_mask)
