"""FP8 errors on the CPU, each against fp32 (relative Frobenius error, random normal inputs, seeded): the Triton
FP8 attention kernel under the Triton interpreter, an FP8 linear, and the tiny DiT with every eligible linear
in FP8 against the same DiT in bf16. The bounds the tests assert are in docs/PERF.md.

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
from aptserve.kernels.triton_attention import triton_attention_fp8


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


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

    model = MMDiT(DIT_PRESETS["tiny"]).eval()
    model.init_weights(torch.Generator().manual_seed(0), zero_out=False)
    g = torch.Generator().manual_seed(1)
    lat, text = torch.randn(1, 16, 5, 8, 8, generator=g), torch.randn(1, 32, 384, generator=g)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, 20:] = False
    model = model.bfloat16()
    args = (lat.bfloat16(), torch.ones(1).bfloat16(), text.bfloat16(), mask)
    bf16 = model(*args)
    layers = quantize_model(model)
    dit = rel(model(*args), bf16)

    print("| what | relative error |")
    print("|---|---:|")
    print(f"| Triton FP8 attention (e4m3 Q/K/V, per-block scales), 1x2x130x128 bf16, vs fp32 | {attention:.2%} |")
    print(f"| FP8 linear (per-channel weight, per-token activation scales), 256 -> 512, 64 tokens | {fp8_linear:.2%} |")
    print(f"| tiny DiT with {layers} FP8 linears vs the same DiT in bf16 | {dit:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
