"""The error floor of e4m3 attention: round Q/K/V (per-block scales) to FP8, then compute attention exactly in
fp32, and compare with fp32 attention. No kernel that stores Q/K/V in e4m3 can beat this on the same inputs.

    python bench/fp8_attention_floor.py [--tokens 512] [--head-dim 128]
"""

from __future__ import annotations

import argparse

import torch

from aptserve.kernels.fp8 import dequantize, quantize_fp8_blockwise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.tokens, args.head_dim) for _ in range(3))

    def fp8(x: torch.Tensor) -> torch.Tensor:
        return dequantize(*quantize_fp8_blockwise(x, args.block), args.block)

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / args.head_dim**0.5, -1) @ v

    ref = attend(q, k, v)
    rows = {
        "Q, K, V in e4m3": attend(fp8(q), fp8(k), fp8(v)),
        "Q, K in e4m3 (V exact)": attend(fp8(q), fp8(k), v),
        "V in e4m3 (Q, K exact)": attend(q, k, fp8(v)),
        "Q, K, V in bf16": attend(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float()),
    }
    print(f"random normal inputs, {args.heads} heads x {args.tokens} tokens x {args.head_dim}, block {args.block}")
    print()
    print("| quantised | relative Frobenius error |")
    print("|---|---:|")
    for name, out in rows.items():
        print(f"| {name} | {((out - ref).norm() / ref.norm()).item():.2%} |")


if __name__ == "__main__":
    main()
