"""Flash-attention forward in Triton (fp16/bf16, and an FP8 e4m3 variant), registered as torch custom ops.

q, k, v are (B, H, N, D) with D in (64, 128) and any Nq, Nk; `key_padding_mask` is (B, Nk) bool, True = real key.
On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1), which is how the tests exercise them.
On Hopper, tiles are loaded through TMA tensor descriptors when the layout allows (16-byte aligned strides); other
GPUs and layouts use pointer loads. docs/PERF.md has the register counts and timings of both.
"""

from __future__ import annotations

import contextlib
import math

import torch

from aptserve.kernels._triton import HAS_TRITON, INTERPRETED, TensorDescriptor, round_to_e4m3, tl, triton
from aptserve.kernels._triton import jit as _jit
from aptserve.kernels.fp8 import E4M3_MAX
from aptserve.kernels.triton_fp8 import quantize_blockwise

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
FP8_BLOCK = 128  # tokens per FP8 scale; every BLOCK_N below divides it, so one V scale covers a whole K/V tile
_LOG2E = 1.4426950408889634
# Load Q/K/V tiles through TMA tensor descriptors where the GPU and the layout allow (module switch for tests).
USE_TMA = True


# ---------------------------------------------------------------------------------------------------------------------
# Capability checks


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
def _attn_tile(
    q, row_scale, m_i, l_i, acc, K, V, DESC_K, DESC_V, MASK, K_SCALE, V_SCALE, off_b, off_h, mask_row,
    scale_row, start_n, stride_kn, stride_kd, stride_vn, stride_vd, N_K,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_BLOCK: tl.constexpr, LOG2_P_SCALE: tl.constexpr, USE_TMA: tl.constexpr,
    INTERPRETER: tl.constexpr,
):  # fmt: skip
    # One BLOCK_N tile of keys folded into the online-softmax state (m_i, l_i, acc); scores in log2 units.
    # BOUNDS: the tile may run past N_K (only the last one can), so the overhang is -inf (and its loads masked).
    # K and V (already offset to this batch and head) are scalar pointers: the tile's addresses are rebuilt from
    # 1-D ranges every tile rather than carried through the loop as 2-D pointer tensors (64-bit each, which alone
    # would fill half the register file and spill). USE_TMA loads the tiles through tensor descriptors instead.
    keys = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:  # rows past N_K come back as zeros
        kt = tl.reshape(DESC_K.load([off_b, off_h, start_n, 0]), [BLOCK_N, HEAD_DIM]).T  # (HEAD_DIM, BLOCK_N)
        if IS_FP8:  # V is stored token-minor: its descriptor spans (B, H, HEAD_DIM, N_K)
            v = tl.reshape(DESC_V.load([off_b, off_h, 0, start_n]), [HEAD_DIM, BLOCK_N]).T
        else:
            v = tl.reshape(DESC_V.load([off_b, off_h, start_n, 0]), [BLOCK_N, HEAD_DIM])
    else:
        dims = tl.arange(0, HEAD_DIM)
        kt_ptrs = K + keys[None, :] * stride_kn + dims[:, None] * stride_kd
        v_ptrs = V + keys[:, None] * stride_vn + dims[None, :] * stride_vd
        if BOUNDS:
            in_range = keys < N_K
            kt = tl.load(kt_ptrs, mask=in_range[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
    p_dtype = v.dtype  # P is rounded to V's storage type: the GPU's dot takes both operands in it
    if INTERPRETER:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt)  # (BLOCK_M, BLOCK_N) fp32, not yet scaled
    if IS_FP8:  # BLOCK_N divides FP8_BLOCK, so one K scale and one V scale cover the whole tile
        row_scale = row_scale * tl.load(K_SCALE + scale_row + start_n // FP8_BLOCK)
    if HAS_MASK:
        real = tl.load(MASK + mask_row + keys, mask=keys < N_K, other=0) != 0
        s = tl.where(real[None, :], s, float("-inf"))
    elif BOUNDS:
        s = tl.where((keys < N_K)[None, :], s, float("-inf"))
    # row_scale > 0, so max(s * scale) = max(s) * scale, and the scaling joins the max subtraction in one FMA.
    m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)
    alpha = tl.math.exp2(m_i - m_new)
    # FP8: P comes out multiplied by 2^LOG2_P_SCALE (the row max lands on e4m3's largest value); l_i sums the same
    # scaled values, so the factor cancels in acc / l_i. fp16/bf16: LOG2_P_SCALE is 0 and P lies in [0, 1].
    p = tl.math.exp2(s * row_scale[:, None] - (m_new - LOG2_P_SCALE)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IS_FP8 and INTERPRETER:  # its fp8 cast truncates
        p = round_to_e4m3(p)
    p = p.to(p_dtype)  # also in the interpreter, so P is rounded as on the GPU
    if INTERPRETER:
        p = p.to(tl.float32)
    if IS_FP8:
        # Each tile's P @ V starts from zero and is added in fp32: Hopper's e4m3 MMA adds into its accumulator with
        # fewer bits than fp32, so accumulating the running sum in place (tl.dot(p, v, acc)) swamps later tiles once
        # acc is large: measured through the apt-8b DiT (V has a mean there), 33% off its bf16 step, 5.4% this way.
        acc += tl.dot(p, v) * tl.load(V_SCALE + scale_row + start_n // FP8_BLOCK)
    else:
        acc = tl.dot(p, v, acc)
    return m_new, l_i, acc


@_jit
def _attn_fwd_kernel(
    Q, K, V, Out, MASK, Q_SCALE, K_SCALE, V_SCALE, DESC_Q, DESC_K, DESC_V,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, H, N_Q, N_K, N_SCALES_Q, N_SCALES_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_FP8: tl.constexpr, FP8_BLOCK: tl.constexpr, LOG2_P_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries of one (batch, head) against all keys, online softmax in base 2, fp32 state.
    # Full key tiles run without bounds checks; only the last, partial tile is masked.
    # IS_FP8: Q/K/V hold e4m3 with per-(b, h, FP8_BLOCK tokens) scales; P is quantised with the fixed scale 2^LOG2_P.
    # INTERPRETER (CPU only) works around two interpreter bugs: its low-precision tl.dot is wrong, so it dots fp32
    # copies (exact for fp8 values, the scales are applied after the dot either way), and its fp8 down-cast
    # truncates, so P is first rounded to nearest as GPUs do. GPUs use native fp16/bf16/fp8 tensor-core dots.
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    K = K + off_b * stride_kb + off_h * stride_kh
    V = V + off_b * stride_vb + off_h * stride_vh
    if USE_TMA:  # (B, H, N, HEAD_DIM) descriptors: rows past N_Q come back as zeros
        q = tl.reshape(DESC_Q.load([off_b, off_h, start_m * BLOCK_M, 0]), [BLOCK_M, HEAD_DIM])
    else:
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=offs_m[:, None] < N_Q, other=0.0)  # (BLOCK_M, HEAD_DIM)
    if INTERPRETER:
        q = q.to(tl.float32)
    if IS_FP8:
        q_scale = tl.load(Q_SCALE + off_bh * N_SCALES_Q + offs_m // FP8_BLOCK, mask=offs_m < N_Q, other=1.0)
        row_scale = q_scale * qk_scale  # (BLOCK_M,), times each tile's K scale
    else:
        row_scale = tl.full([BLOCK_M], qk_scale, dtype=tl.float32)
    # A finite floor instead of -inf keeps exp2(m_i - m_new) NaN-free while every key so far was masked.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    mask_row = off_b * stride_mb
    scale_row = off_bh * N_SCALES_K

    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attn_tile(
            q, row_scale, m_i, l_i, acc, K, V, DESC_K, DESC_V, MASK, K_SCALE, V_SCALE, off_b, off_h,
            mask_row, scale_row, start_n, stride_kn, stride_kd, stride_vn, stride_vd, N_K,
            BLOCK_N, HEAD_DIM, False, HAS_MASK, IS_FP8, FP8_BLOCK, LOG2_P_SCALE, USE_TMA, INTERPRETER,
        )  # fmt: skip
    if n_full < N_K:
        m_i, l_i, acc = _attn_tile(
            q, row_scale, m_i, l_i, acc, K, V, DESC_K, DESC_V, MASK, K_SCALE, V_SCALE, off_b, off_h,
            mask_row, scale_row, n_full, stride_kn, stride_kd, stride_vn, stride_vd, N_K,
            BLOCK_N, HEAD_DIM, True, HAS_MASK, IS_FP8, FP8_BLOCK, LOG2_P_SCALE, USE_TMA, INTERPRETER,
        )  # fmt: skip

    # Rows whose keys are all masked have l_i == 0 and acc == 0: they come out as zeros, not NaN.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < N_Q)


# ---------------------------------------------------------------------------------------------------------------------
# Configs


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on the GPU. The 128-row tiles with 8 warps are
# the usual Hopper winners at head dim 128; the 64-row ones cover head dim 64 and register-limited cases. Configs
# that do not fit shared memory (bf16 128x128 tiles at 4 stages and head dim 128; e4m3 tiles take half) are
# dropped by the autotuner itself.
_HOPPER_TILES = (
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4),
    (128, 128, 8, 2), (128, 128, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
)  # fmt: skip
# Below this many query x key pairs the kernel is launch-bound and tuning buys nothing: the first tile is used as is,
# so a new short sequence length costs one compile instead of a benchmark of every config.
_TUNE_MIN_PAIRS = 1 << 22


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: a tensor descriptor's block shape is the tile of the config about to run."""
    if nargs.get("DESC_Q") is None:
        return
    block_m, block_n, head_dim = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["DESC_Q"].block_shape = [1, 1, block_m, head_dim]
    nargs["DESC_K"].block_shape = [1, 1, block_n, head_dim]
    nargs["DESC_V"].block_shape = [1, 1, head_dim, block_n] if nargs["IS_FP8"] else [1, 1, block_n, head_dim]


def _hopper_configs() -> list:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)
        for bm, bn, warps, stages in _HOPPER_TILES
    ]


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    return configs if named_args["N_Q"] * named_args["N_K"] >= _TUNE_MIN_PAIRS else configs[:1]


# Autotuning under the interpreter would run every config on the CPU; one small config tiles the test shapes enough.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}

if HAS_TRITON and not INTERPRETED:
    _attn_fwd = triton.autotune(
        configs=_hopper_configs(),
        key=["N_Q", "N_K", "HEAD_DIM", "HAS_MASK", "IS_FP8", "USE_TMA"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_attn_fwd_kernel)
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


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can load these (B, H, N, D) tensors: Hopper or newer (or the interpreter), unit
    innermost stride, 16-byte aligned base and outer strides (the TMA unit's rules)."""
    if not USE_TMA or TensorDescriptor is None:
        return False
    on_hopper = tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device) >= (9, 0)
    if not (INTERPRETED or on_hopper):
        return False
    return all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in tensors
    )


def _descriptor(x: torch.Tensor, block: list[int]) -> TensorDescriptor:
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block)


def _launch(q, k, v, mask, out, scales=None) -> None:
    """Run the kernel into `out`; `scales` = (q_scale, k_scale, v_scale) selects the FP8 path, where `v` is stored
    token-minor (`v.transpose(-1, -2)` is contiguous in its last dimension)."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    fp8 = scales is not None
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)  # bool -> u8, same bytes
    q_s, k_s, v_s = (q, q, q) if scales is None else (s.contiguous() for s in scales)  # unused pointers: any tensor
    v_rows = v.transpose(-1, -2) if fp8 else v  # the tensor the V descriptor spans: (B, H, D, N_K) for FP8
    tile = _INTERPRETER_CONFIG if INTERPRETED else {"BLOCK_M": 1, "BLOCK_N": 1}  # the autotuner's pre-hook resets it
    if _tma_usable(q, k, v_rows):
        descriptors = (
            _descriptor(q, [1, 1, tile["BLOCK_M"], D]),
            _descriptor(k, [1, 1, tile["BLOCK_N"], D]),
            _descriptor(v_rows, [1, 1, D, tile["BLOCK_N"]] if fp8 else [1, 1, tile["BLOCK_N"], D]),
        )
    else:
        descriptors = (None, None, None)
    # Scales are in log2 units so the kernel can use exp2.
    qk_scale = D**-0.5 * _LOG2E
    args = (
        q, k, v, out, q if mask_u8 is None else mask_u8, q_s, k_s, v_s, *descriptors,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        0 if mask_u8 is None else mask_u8.stride(0), H, N_Q, N_K,
        math.ceil(N_Q / FP8_BLOCK), math.ceil(N_K / FP8_BLOCK), qk_scale,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": D,
        "HAS_MASK": mask is not None,
        "IS_FP8": fp8,
        "FP8_BLOCK": FP8_BLOCK,
        "LOG2_P_SCALE": math.log2(E4M3_MAX) if fp8 else 0.0,
        "USE_TMA": descriptors[0] is not None,
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


def _token_minor(x: torch.Tensor) -> torch.Tensor:
    """The same (B, H, N, D) values stored as (B, H, D, N padded to 16): a view with unit stride along N."""
    B, H, N, D = x.shape
    storage = torch.empty(B, H, D, -(-N // 16) * 16, dtype=x.dtype, device=x.device)
    storage[..., :N] = x.transpose(-1, -2)
    return storage[..., :N].transpose(-1, -2)


@torch.library.custom_op("aptserve::flash_attention_fp8", mutates_args=())
def _flash_attention_fp8_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    _check(q, k, v, key_padding_mask, fp8=True)
    (q8, q_s), (k8, k_s), (v8, v_s) = (quantize_blockwise(x, FP8_BLOCK) for x in (q, k, v))
    # V stored token-minor (as in the Triton tutorial's FP8 path) so the P @ V operand is K-major for Hopper wgmma;
    # its rows are padded to 16 tokens so that a tensor descriptor can span them (16-byte aligned strides).
    v8 = _token_minor(v8)
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
