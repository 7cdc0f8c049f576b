"""The Triton attention kernel as a TensorRT plugin: compiled ahead of time for Hopper on any machine (no GPU), and
registered as the AOT Quickly Deployable Plugin `aptserve::triton_attention` where TensorRT is installed.

    kernel = compile_attention("bf16", head_dim=128)   # PTX, kernel name, launch parameters: checked in tests here
    register_plugin()                                   # TensorRT >= 10.9 only: unverified (not installable here)

The plugin's inputs are q, k, v (B, H, N, D), contiguous fp16 or bf16, and key_padding_mask (B, Nk) bool (True = real
key; pass all True for unmasked attention); its output is softmax(q k^T / sqrt(D)) v, as `triton_attention` returns.
TensorRT launches an AOT plugin's kernel with its input pointers, then the int32 extra arguments, then its output
pointers, and nothing else. So `_attn_trt_kernel` is an entry point in that order around `_attn_fwd_kernel` (inlined;
pointer loads, since TMA descriptors are host objects TensorRT cannot pass), the softmax scale is a constexpr (extra
arguments are integers only), and the two scratch pointers Triton appends to every kernel (global and profile
scratch, both 0 bytes here) are removed from the PTX entry.

This module needs Triton (compiled, not TRITON_INTERPRET) but not TensorRT; there are no `from __future__`
annotations because `tensorrt.plugin` checks the registered functions' annotations as classes.
"""

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aptserve.kernels._triton import INTERPRETED
from aptserve.kernels.triton_attention import _HOPPER_TILES, _LOG2E, _attn_fwd_kernel

PLUGIN_NAMESPACE = "aptserve"
PLUGIN_NAME = "triton_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_INPUTS = ("q", "k", "v", "key_padding_mask")
PLUGIN_OUTPUTS = ("out",)
ARCH = 90  # Hopper; Triton emits `.target sm_90a` (wgmma), so the PTX runs on sm_90 GPUs only
# PTX ISA 8.7 (CUDA 12.8): Triton would stamp its bundled ptxas's newest ISA (9.4 with Triton 3.9), which the drivers
# and TensorRT builds of CUDA 12.x and early 13.x refuse to load.
PTX_VERSION = 87
DTYPES = ("fp16", "bf16")


class Tile(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


DEFAULT_TILE = Tile(*_HOPPER_TILES[0])  # the autotuner's first Hopper config: (128, 64), 8 warps, 3 stages


@triton.jit
def _attn_trt_kernel(
    Q, K, V, MASK, H, N_Q, N_K, Out,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr,
):  # fmt: skip
    # TensorRT's order: inputs, int32 extras, outputs. Its tensors are dense (B, H, N, D) and (B, Nk), so the strides
    # follow from the shapes (int32, as the JIT launcher passes them: B*H*N*D must stay below 2^31). Then: the mask on,
    # no FP8 (its block size unused), no TMA, not the interpreter.
    _attn_fwd_kernel(
        Q, K, V, Out, MASK, None, None, None, None, None, None,
        H * N_Q * HEAD_DIM, N_Q * HEAD_DIM, HEAD_DIM, 1,
        H * N_K * HEAD_DIM, N_K * HEAD_DIM, HEAD_DIM, 1,
        H * N_K * HEAD_DIM, N_K * HEAD_DIM, HEAD_DIM, 1,
        H * N_Q * HEAD_DIM, N_Q * HEAD_DIM, HEAD_DIM, 1,
        N_K, H, N_Q, N_K, 0, 0, QK_SCALE,
        HEAD_DIM, BLOCK_M, BLOCK_N, True, False, 128, 0.0, False, False,
    )  # fmt: skip


# The kernel's runtime arguments, in launch order: TensorRT supplies exactly these (pointers from the plugin's inputs
# and outputs, the integers from `launch_plan`).
KERNEL_ARGS = tuple(
    name for name, p in inspect.signature(_attn_trt_kernel.fn).parameters.items() if p.annotation is not tl.constexpr
)
EXTRA_ARGS = KERNEL_ARGS[len(PLUGIN_INPUTS) : len(KERNEL_ARGS) - len(PLUGIN_OUTPUTS)]  # ("H", "N_Q", "N_K")
_POINTERS = {"Q", "K", "V", "MASK", "Out"}


@dataclass(frozen=True)
class AotKernel:
    """One compiled kernel: what an AOT plugin hands TensorRT, plus the facts its launch needs."""

    name: str
    ptx: str
    param_types: tuple[str, ...]  # PTX types of the entry's parameters, in order ("u64" pointers, "u32" integers)
    num_warps: int
    shared_mem: int  # bytes of dynamic shared memory per block
    block_m: int

    @property
    def threads(self) -> int:
        return self.num_warps * 32


class LaunchPlan(NamedTuple):
    """Grid, block, shared memory and the int32 extra arguments; ints, or TensorRT shape expressions in the plugin."""

    grid: tuple[Any, Any, Any]
    threads: int
    shared_mem: int
    extra_args: tuple[Any, ...]


def launch_plan(kernel: AotKernel, batch: Any, heads: Any, n_q: Any, n_k: Any) -> LaunchPlan:
    """One program per BLOCK_M queries of one (batch, head), as `triton_attention` launches it.

    Uses only + - * //, so the same code runs on ints and on `tensorrt.plugin` shape expressions.
    """
    grid = ((n_q + kernel.block_m - 1) // kernel.block_m, batch * heads, 1)
    return LaunchPlan(grid, kernel.threads, kernel.shared_mem, (heads, n_q, n_k))


def entry_params(ptx: str, name: str) -> list[tuple[str, str]]:
    """(type, name) of each parameter of the `.entry name(...)` in `ptx`, in order."""
    entry = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)[^,]*?\s(\w+)\s*(?:,|$)", entry.group(1).strip())


def _drop_trailing_params(ptx: str, name: str, keep: int) -> str:
    """The PTX with the entry's parameters after the first `keep` removed; they must be unreferenced."""
    dropped = [param for _, param in entry_params(ptx, name)[keep:]]
    for param in dropped:
        if len(re.findall(rf"\b{param}\b", ptx)) != 1:
            raise ValueError(f"PTX parameter {param} is used by the kernel body; it cannot be dropped")
        ptx = re.sub(rf",?\s*\.param[^,()]*\b{param}\b", "", ptx, count=1)
    return ptx


def _compile_options(tile: Tile) -> dict[str, int | bool]:
    # FMA contraction on, as the JIT compiles `triton_attention` today (Triton 3.9 warns that its default will change)
    return {
        "num_warps": tile.num_warps,
        "num_stages": tile.num_stages,
        "ptx_version": PTX_VERSION,
        "enable_fp_fusion": True,
    }


@functools.cache
def compile_attention(dtype: str = "bf16", head_dim: int = 128, tile: Tile = DEFAULT_TILE) -> AotKernel:
    """Compile `_attn_trt_kernel` for sm_90 (no GPU needed) with Q/K/V/Out of `dtype` and the key padding mask.

    Pointers are declared 16-byte aligned (assumed of TensorRT's plugin tensors, unverified), which lets the loads
    vectorise. Seconds per call; cached per argument set.
    """
    if INTERPRETED:
        raise RuntimeError("the AOT compile needs compiled Triton: unset TRITON_INTERPRET")
    if dtype not in DTYPES or head_dim not in (64, 128):
        raise ValueError(f"the plugin supports dtype in {DTYPES} and head dim 64 or 128; got {dtype}, {head_dim}")
    names = _attn_trt_kernel.arg_names
    signature = {name: "i32" if name in KERNEL_ARGS else "constexpr" for name in names}
    signature |= {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "MASK": "*u8", "Out": f"*{dtype}"}
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
    constexprs["QK_SCALE"] = head_dim**-0.5 * _LOG2E  # scores in log2 units, as `triton_attention` passes it
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in _POINTERS}
    source = ASTSource(_attn_trt_kernel, signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options=_compile_options(tile))
    meta = compiled.metadata
    # Triton 3.3 added a global scratch pointer, later versions a profile one: unused, or TensorRT cannot launch this
    scratch = {kind: getattr(meta, f"{kind}_scratch_size", 0) for kind in ("global", "profile")}
    if any(scratch.values()):
        raise RuntimeError(
            f"{meta.name} needs scratch memory {scratch} (bytes), which a TensorRT AOT plugin cannot supply"
        )
    ptx = _drop_trailing_params(compiled.asm["ptx"], meta.name, keep=len(KERNEL_ARGS))
    param_types = tuple(kind for kind, _ in entry_params(ptx, meta.name))
    return AotKernel(meta.name, ptx, param_types, meta.num_warps, meta.shared, tile.block_m)


@functools.cache
def register_plugin() -> None:
    """Register `aptserve::triton_attention` (shape/dtype descriptor and AOT implementation) with TensorRT.

    Unverified: TensorRT cannot be installed where this project is tested. Idempotent (registers once per process).
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtypes = {trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16"}

    @trtp.register(PLUGIN_ID)
    def describe(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_padding_mask: trtp.TensorDesc
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.aot_impl(PLUGIN_ID)
    def aot_impl(
        q, k, v, key_padding_mask, outputs, tactic
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        # one kernel per dtype and head dim, so `tactic` (TensorRT's choice among autotune tactics) is not consulted
        head_dim = q.shape_expr[3]
        if head_dim.is_fake or not head_dim.is_constant:
            raise ValueError("the triton_attention plugin needs a static head dim (a constexpr of the kernel)")
        if q.dtype not in dtypes:
            raise ValueError(f"the triton_attention plugin takes fp16 or bf16 q/k/v; got {q.dtype}")
        kernel = compile_attention(dtypes[q.dtype], head_dim.constant_value())
        batch, heads, n_q, _ = q.shape_expr
        plan = launch_plan(kernel, batch, heads, n_q, k.shape_expr[2])
        launch = trtp.KernelLaunchParams(
            grid_x=plan.grid[0], grid_y=plan.grid[1], block_x=plan.threads, shared_mem=plan.shared_mem
        )
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(arg) for arg in plan.extra_args])
        return kernel.name, kernel.ptx, launch, extra
