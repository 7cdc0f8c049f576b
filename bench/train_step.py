"""Seconds per teacher training step (flow matching, AdamW) in float32 and in bfloat16 mixed precision, measured
in one run with the two interleaved, on random latents of the tiny model's real shapes (64x64x49 -> 16x13x8x8).

    .venv/bin/python bench/train_step.py [--steps 6] [--batch 32] [--threads 2]

bfloat16 autocast runs the matmuls on the CPU's AMX / AVX512-BF16 units where it has them (`lscpu | grep amx`);
weights, optimiser state and the loss stay float32. Prints the median step time of each, their ratio, and the
relative error of the bfloat16 loss and velocity against float32 on the same batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import machine_line

from aptserve.engines.dit import DIT_PRESETS, MMDiT
from aptserve.engines.sampling import add_noise
from aptserve.training.common import autocast
from aptserve.training.stage_diffusion import flow_matching_loss

MODES = ("float32", "bfloat16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode, after one untimed warm-up")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dit", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MMDiT(DIT_PRESETS[args.dit])
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = model.config
    x0 = torch.randn(args.batch, cfg.in_channels, 13, 8, 8)
    text = torch.randn(args.batch, 32, cfg.text_dim)
    mask = torch.arange(32).expand(args.batch, -1) < 20

    def step(mode: str) -> float:
        start = time.perf_counter()
        with autocast(mode):
            loss = flow_matching_loss(model, x0, text, mask, torch.rand(args.batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:
        step(mode)  # warm-up
    for _ in range(args.steps):
        for mode in MODES:
            times[mode].append(step(mode))

    with torch.no_grad():
        t = torch.rand(args.batch, generator=torch.Generator().manual_seed(1))
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        x_t = add_noise(x0, eps, t)
        outputs = {}
        for mode in MODES:
            with autocast(mode):
                outputs[mode] = model(x_t, t, text, mask).float()
        reference, mixed = outputs["float32"], outputs["bfloat16"]
        error = ((mixed - reference).norm() / reference.norm()).item()

    median = {mode: statistics.median(values) for mode, values in times.items()}
    print(machine_line(args.threads))
    print(f"DiT {args.dit}, batch {args.batch}, {args.steps} interleaved steps per mode")
    print("| compute dtype | median s/step | min | max |")
    print("|---|---:|---:|---:|")
    for mode in MODES:
        print(f"| {mode} | {median[mode]:.3f} | {min(times[mode]):.3f} | {max(times[mode]):.3f} |")
    print(f"bfloat16 speed-up: {median['float32'] / median['bfloat16']:.2f}x; velocity relative error {error:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
