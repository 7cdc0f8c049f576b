"""Flash-attention forward in Triton (fp16/bf16, and an FP8 e4m3 variant), registered as torch custom ops.

q, k, v are (B, H, N, D) with D in (64, 128) and any Nq, Nk; `key_padding_mask` is (B, Nk) bool, True = real key.
On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1), which is how the tests exercise them.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from kernels.fp8 import E4M3_MAX, quantize_fp8_blockwise

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False

# Without triton the kernel stays a plain function (never called: unsupported_reason says why); postponed annotations
# keep its `tl.constexpr` hints from being evaluated.
_jit = triton.jit if HAS_TRITON else (lambda fn: fn)

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
FP8_BLOCK = 128  # tokens per FP8 scale; every BLOCK_N below divides it, so one V scale covers a whole K/V tile
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------------------
# Capability checks


def _interpret_requested() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# triton.jit picks compiled vs interpreted when it decorates, and triton decorates its own tl.max/tl.sum when it is
# imported, so TRITON_INTERPRET must be set before `import triton`; setting it later has no effect on this process.
INTERPRETED = HAS_TRITON and _interpret_requested()


def unsupported_reason(q: torch.Tensor, fp8: bool = False) -> str | None:
    """Why the Triton kernel cannot run on tensors like `q`, or None if it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float16 or bfloat16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not supported (one of {HEAD_DIMS})"
    if q.device.type == "cpu" and not INTERPRETED:
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"
    if q.device.type == "cuda" and not INTERPRETED:
        props = torch.cuda.get_device_properties(q.device)  # torch.compile constant-folds this call
        capability = (props.major, props.minor)
        if q.dtype == torch.bfloat16 and capability < (8, 0):
            return f"bfloat16 needs compute capability >= 8.0; this GPU has {capability}"
        if fp8 and capability < (8, 9):
            return f"FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU has {capability}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Kernel


@_jit
def _attn_fwd_kernel(
    Q, K, V, Out, MASK, Q_SCALE, K_SCALE, V_SCALE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, H, N_Q, N_K, N_SCALES_Q, N_SCALES_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_FP8: tl.constexpr, FP8_BLOCK: tl.constexpr, P_SCALE: tl.constexpr,
    INTERPRETER: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries of one (batch, head) against all keys, online softmax in base 2, fp32 state.
    # IS_FP8: Q/K/V hold e4m3 with per-(b, h, FP8_BLOCK tokens) scales; P is quantised with the fixed P_SCALE.
    # INTERPRETER (CPU only) works around two interpreter bugs: its low-precision tl.dot is wrong, so it dots fp32
    # copies (exact for fp8 values, the scales are applied after the dot either way), and its fp8 down-cast
    # truncates, so P is first rounded to nearest as GPUs do. GPUs use native fp16/bf16/fp8 tensor-core dots.
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    kt_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    q = tl.load(q_ptrs, mask=offs_m[:, None] < N_Q, other=0.0)  # (BLOCK_M, HEAD_DIM)
    if INTERPRETER:
        q = q.to(tl.float32)
    if IS_FP8:
        q_scale = tl.load(Q_SCALE + off_bh * N_SCALES_Q + offs_m // FP8_BLOCK, mask=offs_m < N_Q, other=0.0)
        q_scale = q_scale * qk_scale  # (BLOCK_M,)
    # A finite floor instead of -inf keeps exp2(m_i - m_new) NaN-free while every key so far was masked.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for start_n in range(0, N_K, BLOCK_N):
        keys = start_n + offs_n
        valid = keys < N_K
        kt = tl.load(kt_ptrs + start_n * stride_kn, mask=valid[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=valid[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        if INTERPRETER:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt)  # (BLOCK_M, BLOCK_N) fp32
        if IS_FP8:
            k_scale = tl.load(K_SCALE + off_bh * N_SCALES_K + keys // FP8_BLOCK, mask=valid, other=0.0)
            s = s * q_scale[:, None] * k_scale[None, :]
        else:
            s = s * qk_scale
        if HAS_MASK:
            valid = valid & (tl.load(MASK + off_b * stride_mb + keys, mask=valid, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N) in [0, 1]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        if IS_FP8:
            p = p * P_SCALE
            if INTERPRETER:  # round to e4m3's 3 mantissa bits (normals, then subnormals at 2^-9) so the cast is exact
                ulp = tl.math.exp2(tl.math.floor(tl.math.log2(tl.maximum(p, 0.015625))) - 3.0)
                p = tl.math.floor(p / ulp + 0.5) * ulp
            p = p.to(V.dtype.element_ty)
            if INTERPRETER:
                p = p.to(tl.float32)
            v_scale = tl.load(V_SCALE + off_bh * N_SCALES_K + start_n // FP8_BLOCK)
            acc += tl.dot(p, v) * (v_scale / P_SCALE)
        else:
            p = p.to(V.dtype.element_ty)  # rounds P like the GPU path does, also in the interpreter
            if INTERPRETER:
                p = p.to(tl.float32)
            acc = tl.dot(p, v, acc)

    # Rows whose keys are all masked have l_i == 0 and acc == 0: they come out as zeros, not NaN.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_Q)


# ---------------------------------------------------------------------------------------------------------------------
# Configs


def _hopper_configs() -> list:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm in (64, 128)
        for bn in (64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


# Autotuning under the interpreter would run every config on the CPU; one small config tiles the test shapes enough.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}

if HAS_TRITON and not INTERPRETED:
    _attn_fwd = triton.autotune(configs=_hopper_configs(), key=["N_Q", "N_K", "HEAD_DIM", "HAS_MASK", "IS_FP8"])(
        _attn_fwd_kernel
    )
else:
    _attn_fwd = _attn_fwd_kernel


# ---------------------------------------------------------------------------------------------------------------------
# Launcher


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, fp8: bool) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q (B,H,Nq,D) and k, v (B,H,Nk,D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must share dtype and device; got {q.dtype, k.dtype, v.dtype}")
    expected_mask = (k.shape[0], k.shape[2])
    if mask is not None and (mask.shape != expected_mask or mask.dtype != torch.bool or mask.device != q.device):
        raise ValueError(
            f"key_padding_mask must be bool {expected_mask} on {q.device}; got {mask.dtype} {tuple(mask.shape)} "
            f"on {mask.device}"
        )
    reason = unsupported_reason(q, fp8=fp8)
    if reason is not None:
        raise ValueError(f"triton attention cannot run: {reason}")


def _launch(q, k, v, mask, out, scales=None) -> None:
    """Run the kernel into `out`; `scales` = (q_scale, k_scale, v_scale) selects the FP8 path."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)  # bool -> u8, same bytes
    q_s, k_s, v_s = (q, q, q) if scales is None else (s.contiguous() for s in scales)  # unused pointers: any tensor
    # Scales are in log2 units so the kernel can use exp2.
    qk_scale = D**-0.5 * _LOG2E
    args = (
        q, k, v, out, q if mask_u8 is None else mask_u8, q_s, k_s, v_s,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        0 if mask_u8 is None else mask_u8.stride(0), H, N_Q, N_K,
        math.ceil(N_Q / FP8_BLOCK), math.ceil(N_K / FP8_BLOCK), qk_scale,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": D,
        "HAS_MASK": mask is not None,
        "IS_FP8": scales is not None,
        "FP8_BLOCK": FP8_BLOCK,
        "P_SCALE": E4M3_MAX,
        "INTERPRETER": INTERPRETED,
    }

    def grid(config):
        return (triton.cdiv(N_Q, config["BLOCK_M"]), B * H)

    if INTERPRETED:
        meta |= _INTERPRETER_CONFIG
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attn_fwd[grid](*args, **meta)


def _with_unit_stride_d(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops and public functions


@torch.library.custom_op("aptserve::flash_attention", mutates_args=())
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    _check(q, k, v, key_padding_mask, fp8=False)
    out = torch.empty_like(q)
    _launch(_with_unit_stride_d(q), _with_unit_stride_d(k), _with_unit_stride_d(v), key_padding_mask, out)
    return out


@torch.library.custom_op("aptserve::flash_attention_fp8", mutates_args=())
def _flash_attention_fp8_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    _check(q, k, v, key_padding_mask, fp8=True)
    (q8, q_s), (k8, k_s), (v8, v_s) = (quantize_fp8_blockwise(x, FP8_BLOCK) for x in (q, k, v))
    # V stored token-minor (as in the Triton tutorial's FP8 path) so the P @ V operand is K-major for Hopper wgmma.
    v8 = v8.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = torch.empty_like(q)
    _launch(q8, k8, v8, key_padding_mask, out, scales=(q_s, k_s, v_s))
    return out


@_flash_attention_op.register_fake
def _(q, k, v, key_padding_mask):
    return torch.empty_like(q)


@_flash_attention_fp8_op.register_fake
def _(q, k, v, key_padding_mask):
    return torch.empty_like(q)


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Flash-attention forward (fp16/bf16, head dim 64 or 128): softmax(q k^T / sqrt(D)) v over real keys.

    Query rows with no real key at all come out as zeros (the references give NaN there). Forward only: no autograd.
    """
    return torch.ops.aptserve.flash_attention(q, k, v, key_padding_mask)


def triton_attention_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Like `triton_attention`, but Q/K/V/P in e4m3 with block scales; output in q's dtype. Changes numerics."""
    return torch.ops.aptserve.flash_attention_fp8(q, k, v, key_padding_mask)
