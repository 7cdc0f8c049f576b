"""Latent statistics of one-step generators against real training latents: overall std and the mean squared
difference between neighbouring latents along time, height and width (summed), a cheap read of how noisy or
smooth a generator's latents are before decoding.

    .venv/bin/python bench/latent_stats.py models/shapes-cd-tiny models/shapes-apt-tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.loading import load_components
from training.latents import LatentSet
from training.stage_apt import generate


def difference_energy(x: torch.Tensor) -> float:
    return sum(x.diff(dim=d).pow(2).mean().item() for d in (-3, -2, -1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="one-step generator checkpoints")
    parser.add_argument("--latents", default="runs/latents-tiny.pt")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = LatentSet.load(args.latents)
    real, text, mask = data.batch(torch.randint(len(data), (args.samples,)))
    noise = torch.randn_like(real)
    print(f"{args.samples} training prompts, seed {args.seed}")
    print("| latents | std | difference energy |")
    print("|---|---:|---:|")
    print(f"| real | {real.std().item():.3f} | {difference_energy(real):.3f} |")
    for name in args.models:
        _, modules = load_components(name, ("dit",))
        with torch.no_grad():
            fake = generate(modules["dit"].eval(), noise, text, mask)
        print(f"| {name} | {fake.std().item():.3f} | {difference_energy(fake):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
