"""8-bit flash attention in Triton, SageAttention2's scheme: INT8 Q.K^T and FP8 (e4m3) P.V, as a torch custom op.

Quantisation (smoothed K and V, int8 Q/K with per-token scales, e4m3 V with per-channel scales) is `kernels.int8`'s,
in torch; `kernels.int8.sage_attention_reference` emulates this kernel in fp32 and is what the tests compare it with.
P.V accumulates in two levels: each group of GROUP_N keys (a few tiles) adds into a local fp32 buffer through the
tensor cores' own accumulation, and the buffer is added to the main fp32 accumulator at the end of every group.
q, k, v are (B, H, N, D) fp16/bf16 with D in (64, 128) and any lengths; the GPU rules are triton_attention's for FP8
(`unsupported_reason(q, fp8=True)`: e4m3 MMA needs sm_89, int8 MMA sm_80); on CPU it runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import math

import torch

from aptserve.kernels._triton import HAS_TRITON, INTERPRETED, round_to_e4m3, tl, triton
from aptserve.kernels._triton import jit as _jit
from aptserve.kernels.fp8 import E4M3_MAX
from aptserve.kernels.int8 import SageInputs, quantize_sage
from aptserve.kernels.triton_attention import (
    _HOPPER_TILES,
    _LOG2E,
    _check,
    _descriptor,
    _prune_configs,
    _tma_usable,
    _token_minor,
)

# Keys per promotion of the P.V buffer. Hopper's e4m3 MMA adds into its accumulator with fewer bits than fp32
# (13 mantissa bits, "FP22", per SageAttention2), so an accumulator that runs over all keys loses later tiles once it
# is large (33% off through the apt-8b DiT, commit 84ddc81). Restarting at every tile, as triton_fp8 does, costs a
# zeroed buffer and an add per tile; promoting every 256 keys (8 MMA k-steps of 32 at BLOCK_N 64 or 128) bounds the
# imprecise part to a few hundred keys' worth, about 2^-13 per step relative to that group's sum, whatever the length.
GROUP_N = 256
USE_TMA = True  # module switch for tests, as in triton_attention


# ---------------------------------------------------------------------------------------------------------------------
# Kernel


@_jit
def _int8_tile(
    q, row_scale, m_i, l_i, pv, owed, K, V, DESC_K, DESC_V, MASK, K_SCALE, off_b, off_h, mask_row, scale_row,
    start_n, stride_kn, stride_kd, stride_vn, stride_vd, N_K,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
    LOG2_P_SCALE: tl.constexpr, USE_TMA: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    # One BLOCK_N tile of keys folded into the online-softmax state; scores in log2 units. `pv` is the group's local
    # P.V buffer (rescaled here with the running max) and `owed` the product of the rescalings that the main
    # accumulator has not yet received. BOUNDS: the tile may run past N_K (only the last one can).
    keys = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:  # rows past N_K come back as zeros; V is stored token-minor, its descriptor spans (B, H, D, N_K)
        kt = tl.reshape(DESC_K.load([off_b, off_h, start_n, 0]), [BLOCK_N, HEAD_DIM]).T  # (HEAD_DIM, BLOCK_N) int8
        v = tl.reshape(DESC_V.load([off_b, off_h, 0, start_n]), [HEAD_DIM, BLOCK_N]).T  # (BLOCK_N, HEAD_DIM) e4m3
    else:
        dims = tl.arange(0, HEAD_DIM)
        kt_ptrs = K + keys[None, :] * stride_kn + dims[:, None] * stride_kd
        v_ptrs = V + keys[:, None] * stride_vn + dims[None, :] * stride_vd
        if BOUNDS:
            kt = tl.load(kt_ptrs, mask=(keys < N_K)[None, :], other=0)
            v = tl.load(v_ptrs, mask=(keys < N_K)[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
    if BOUNDS:
        k_scale = tl.load(K_SCALE + scale_row + keys, mask=keys < N_K, other=0.0)
    else:
        k_scale = tl.load(K_SCALE + scale_row + keys)
    p_dtype = v.dtype
    if INTERPRETER:  # its e4m3 dot goes through fp16; an fp32 copy is exact (its int8 dot is int32, as on GPUs)
        v = v.to(tl.float32)
    s = tl.dot(q, kt).to(tl.float32) * k_scale[None, :]  # an exact int32 dot; still missing the row's scale
    if HAS_MASK:
        real = tl.load(MASK + mask_row + keys, mask=keys < N_K, other=0) != 0
        s = tl.where(real[None, :], s, float("-inf"))
    elif BOUNDS:
        s = tl.where((keys < N_K)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)  # row_scale > 0
    alpha = tl.math.exp2(m_i - m_new)
    # P times 2^LOG2_P_SCALE = 448: the running row max lands on e4m3's largest value; l_i sums the same scaled,
    # unrounded values, so the factor cancels at the end.
    p = tl.math.exp2(s * row_scale[:, None] - (m_new - LOG2_P_SCALE)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if INTERPRETER:  # its fp8 cast truncates; round to nearest even first, as the GPU's cvt.rn does
        p = round_to_e4m3(p)
    p = p.to(p_dtype)
    if INTERPRETER:
        p = p.to(tl.float32)
    pv = tl.dot(p, v, pv * alpha[:, None])  # in place: the tensor cores' accumulation, bounded by the group
    return m_new, l_i, pv, owed * alpha


@_jit
def _int8_attn_kernel(
    Q, K, V, Out, MASK, Q_SCALE, K_SCALE, V_SCALE, V_MEAN, DESC_Q, DESC_K, DESC_V,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, H, N_Q, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_MASK: tl.constexpr, LOG2_P_SCALE: tl.constexpr, USE_TMA: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries of one (batch, head) against all keys. Q/K are int8 with per-token scales, V e4m3
    # (smoothed) with per-channel scales applied once at the end, where V's mean is added back.
    # Full key tiles run without bounds checks, and after every GROUP_N keys the local P.V buffer is promoted into
    # `acc`; the last group (with the partial tile, if any) is promoted after the loop.
    tl.static_assert(GROUP_N % BLOCK_N == 0)
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    K = K + off_b * stride_kb + off_h * stride_kh
    V = V + off_b * stride_vb + off_h * stride_vh
    if USE_TMA:
        q = tl.reshape(DESC_Q.load([off_b, off_h, start_m * BLOCK_M, 0]), [BLOCK_M, HEAD_DIM])
    else:
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=offs_m[:, None] < N_Q, other=0)  # (BLOCK_M, HEAD_DIM) int8
    q_scale = tl.load(Q_SCALE + off_bh * N_Q + offs_m, mask=offs_m < N_Q, other=1.0)
    row_scale = q_scale * qk_scale  # (BLOCK_M,)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: exp2(m_i - m_new) stays NaN-free while all masked
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pv = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    owed = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    mask_row = off_b * stride_mb
    scale_row = off_bh * N_K

    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, pv, owed = _int8_tile(
            q, row_scale, m_i, l_i, pv, owed, K, V, DESC_K, DESC_V, MASK, K_SCALE, off_b, off_h, mask_row,
            scale_row, start_n, stride_kn, stride_kd, stride_vn, stride_vd, N_K,
            BLOCK_N, HEAD_DIM, False, HAS_MASK, LOG2_P_SCALE, USE_TMA, INTERPRETER,
        )  # fmt: skip
        if (start_n + BLOCK_N) % GROUP_N == 0:
            acc = acc * owed[:, None] + pv
            pv = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            owed = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if n_full < N_K:
        m_i, l_i, pv, owed = _int8_tile(
            q, row_scale, m_i, l_i, pv, owed, K, V, DESC_K, DESC_V, MASK, K_SCALE, off_b, off_h, mask_row,
            scale_row, n_full, stride_kn, stride_kd, stride_vn, stride_vd, N_K,
            BLOCK_N, HEAD_DIM, True, HAS_MASK, LOG2_P_SCALE, USE_TMA, INTERPRETER,
        )  # fmt: skip
    acc = acc * owed[:, None] + pv

    # Rows without a real key have l_i == 0 and acc == 0, and their batch's V mean is zero: they come out as zeros.
    v_scale = tl.load(V_SCALE + off_bh * HEAD_DIM + offs_d)
    v_mean = tl.load(V_MEAN + off_bh * HEAD_DIM + offs_d)
    out = acc * (v_scale[None, :] / tl.where(l_i == 0.0, 1.0, l_i)[:, None]) + v_mean[None, :]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_Q)


# ---------------------------------------------------------------------------------------------------------------------
# Configs: triton_attention's tiles (every BLOCK_N there divides GROUP_N); int8/e4m3 tiles take half the shared memory.


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: a tensor descriptor's block shape is the tile of the config about to run."""
    if nargs.get("DESC_Q") is None:
        return
    block_m, block_n, head_dim = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["DESC_Q"].block_shape = [1, 1, block_m, head_dim]
    nargs["DESC_K"].block_shape = [1, 1, block_n, head_dim]
    nargs["DESC_V"].block_shape = [1, 1, head_dim, block_n]


_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}

if HAS_TRITON and not INTERPRETED:
    _int8_attn = triton.autotune(
        configs=[
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes
            )
            for bm, bn, warps, stages in _HOPPER_TILES
        ],
        key=["N_Q", "N_K", "HEAD_DIM", "HAS_MASK", "USE_TMA"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_int8_attn_kernel)
else:
    _int8_attn = _int8_attn_kernel


# ---------------------------------------------------------------------------------------------------------------------
# Launcher, custom op and public function


def _launch(x: SageInputs, mask: torch.Tensor | None, out: torch.Tensor) -> None:
    """Run the kernel on quantised inputs into `out`; `x.v` is stored token-minor (see triton_attention)."""
    B, H, N_Q, D = x.q.shape
    N_K = x.k.shape[2]
    v_rows = x.v.transpose(-1, -2)  # (B, H, D, N_K), unit stride along N_K
    tile = _INTERPRETER_CONFIG if INTERPRETED else {"BLOCK_M": 1, "BLOCK_N": 1}  # the pre-hook resets it
    if USE_TMA and _tma_usable(x.q, x.k, v_rows):
        descriptors = (
            _descriptor(x.q, [1, 1, tile["BLOCK_M"], D]),
            _descriptor(x.k, [1, 1, tile["BLOCK_N"], D]),
            _descriptor(v_rows, [1, 1, D, tile["BLOCK_N"]]),
        )
    else:
        descriptors = (None, None, None)
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)  # bool -> u8, same bytes
    args = (
        x.q, x.k, x.v, out, x.q if mask_u8 is None else mask_u8,
        x.q_scale.contiguous(), x.k_scale.contiguous(), x.v_scale.contiguous(), x.v_mean.contiguous(), *descriptors,
        *x.q.stride(), *x.k.stride(), *x.v.stride(), *out.stride(),
        0 if mask_u8 is None else mask_u8.stride(0), H, N_Q, N_K, D**-0.5 * _LOG2E,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": D,
        "GROUP_N": GROUP_N,
        "HAS_MASK": mask is not None,
        "LOG2_P_SCALE": math.log2(E4M3_MAX),
        "USE_TMA": descriptors[0] is not None,
        "INTERPRETER": INTERPRETED,
    }
    if INTERPRETED:
        meta |= _INTERPRETER_CONFIG

    def grid(config):
        return (triton.cdiv(N_Q, config["BLOCK_M"]), B * H)

    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _int8_attn[grid](*args, **meta)


@torch.library.custom_op("aptserve::sage_attention_int8", mutates_args=())
def _sage_attention_int8_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    _check(q, k, v, key_padding_mask, fp8=True)
    x = quantize_sage(q, k, v, key_padding_mask)
    # V token-minor, rows padded to 16 tokens: the P.V operand is K-major for Hopper's wgmma and a descriptor spans it.
    x = x._replace(v=_token_minor(x.v))
    out = torch.empty_like(q)
    _launch(x, key_padding_mask, out)
    return out


@_sage_attention_int8_op.register_fake
def _(q, k, v, key_padding_mask):
    return torch.empty_like(q)


def triton_attention_int8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Like `triton_attention`, with INT8 Q.K^T and FP8 P.V (SageAttention2); output in q's dtype. Changes numerics:
    `kernels.int8.sage_attention_reference` is the same computation in fp32 torch."""
    return torch.ops.aptserve.sage_attention_int8(q, k, v, key_padding_mask)
