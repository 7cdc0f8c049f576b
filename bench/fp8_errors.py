"""FP8 errors on the CPU, each against fp32 (relative Frobenius error, random normal inputs, seeded): the Triton
FP8 attention kernel under the Triton interpreter, an FP8 linear, and the tiny DiT with every eligible linear
in FP8 against the same DiT in bf16. Then the 8-bit attention (INT8 Q.K^T, FP8 P.V): its Triton kernel under the
interpreter and its torch emulation on the inputs of tests/kernels/test_int8_attention.py, and the tiny DiT with it.
The bounds the tests assert are in docs/PERF.md.

    .venv/bin/python bench/fp8_errors.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernel on the CPU

import torch
from torch import nn

from aptserve import kernels
from aptserve.engines.config import DIT_PRESETS
from aptserve.engines.dit import MMDiT
from aptserve.engines.quant import FP8Linear, quantize_model
from aptserve.kernels.int8 import sage_attention_reference
from aptserve.kernels.triton_attention import triton_attention_fp8
from aptserve.kernels.triton_int8 import triton_attention_int8


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def int8_inputs(nq: int, nk: int, d: int, dit_like: bool, masked: bool, seed: int = 1) -> tuple:
    """The tests' inputs: "DiT-like" K has per-channel offsets and 4 tokens 10x out, V a mean of 2; the mask
    keeps a third of batch 0's keys (garbage under the rest)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, d, generator=g) for n in (nq, nk, nk))
    if dit_like:
        k[:, :, torch.randperm(nk, generator=g)[:4]] *= 10
        k = k + 3 * torch.randn(1, 2, 1, d, generator=g)
        v = v + 2.0
    mask = None
    if masked:
        mask = torch.ones(2, nk, dtype=torch.bool)
        mask[0, nk // 3 :] = False
        k, v = k.masked_fill(~mask[:, None, :, None], 50.0), v.masked_fill(~mask[:, None, :, None], 300.0)
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), mask


def int8_attention_rows() -> list[str]:
    rows = []
    for dit_like in (True, False):
        for nq, nk, d in ((67, 130, 64), (67, 130, 128), (33, 577, 64)):
            for masked in (False, True):
                q, k, v, mask = int8_inputs(nq, nk, d, dit_like, masked)
                ref = kernels.reference_attention(q.float(), k.float(), v.float(), mask)
                out, emulated = triton_attention_int8(q, k, v, mask), sage_attention_reference(q, k, v, mask)
                bf16 = kernels.reference_attention(q, k, v, mask)
                name = f"{'DiT-like' if dit_like else 'randn'} 2x2x{nq}x{nk}x{d}{', mask' if masked else ''}"
                errors = (rel(out, ref), rel(emulated, ref), rel(out, emulated), rel(bf16, ref))
                rows.append(f"| {name} | " + " | ".join(f"{e:.2%}" for e in errors) + " |")
    return rows


def tiny_dit(dtype: torch.dtype) -> tuple[MMDiT, tuple]:
    model = MMDiT(DIT_PRESETS["tiny"]).eval()
    model.init_weights(torch.Generator().manual_seed(0), zero_out=False)
    g = torch.Generator().manual_seed(1)
    lat, text = torch.randn(1, 16, 5, 8, 8, generator=g), torch.randn(1, 32, 384, generator=g)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, 20:] = False
    return model.to(dtype), (lat.to(dtype), torch.ones(1).to(dtype), text.to(dtype), mask)


def dit_with(impl: str, dtype: torch.dtype) -> torch.Tensor:
    model, args = tiny_dit(dtype)
    model.attention_impl = impl
    return model(*args)


@torch.no_grad()
def main() -> int:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 130, 128, generator=g).bfloat16() for _ in range(3))
    attention = rel(triton_attention_fp8(q, k, v, None), kernels.reference_attention(q.float(), k.float(), v.float()))

    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 512)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(512, 256, generator=g) / 16)
        linear.bias.copy_(torch.randn(512, generator=g) / 16)
    x = torch.randn(64, 256, generator=g)
    fp8_linear = rel(FP8Linear.from_linear(linear)(x), linear(x))

    model, args = tiny_dit(torch.bfloat16)
    bf16 = model(*args)
    layers = quantize_model(model)
    dit = rel(model(*args), bf16)

    print("| what | relative error |")
    print("|---|---:|")
    print(f"| Triton FP8 attention (e4m3 Q/K/V, per-block scales), 1x2x130x128 bf16, vs fp32 | {attention:.2%} |")
    print(f"| FP8 linear (per-channel weight, per-token activation scales), 256 -> 512, 64 tokens | {fp8_linear:.2%} |")
    print(f"| tiny DiT with {layers} FP8 linears vs the same DiT in bf16 | {dit:.2%} |")
    print()
    print("8-bit attention (INT8 Q.K^T, FP8 P.V), bf16 inputs, relative error:")
    print()
    print("| inputs | kernel vs fp32 | emulation vs fp32 | kernel vs emulation | bf16 torch vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(int8_attention_rows()))
    dit_bf16 = rel(dit_with("int8_emulated", torch.bfloat16), dit_with("sdpa", torch.bfloat16))
    dit_fp32 = rel(dit_with("int8_emulated", torch.float32), dit_with("reference", torch.float32))
    print(f"| tiny DiT, bf16: 8-bit emulation vs SDPA | {dit_bf16:.2%} | | | |")
    print(f"| tiny DiT, fp32: 8-bit emulation vs fp32 reference | {dit_fp32:.2%} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
