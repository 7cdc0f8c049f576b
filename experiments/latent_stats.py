"""Latent statistics of one-step generators against real training latents: overall std and the mean squared
difference between neighbouring latents along time, height and width (summed), a cheap read of how noisy or
smooth a generator's latents are before decoding; and the std of each latent frame, since the causal VAE's first
latent frames (which see the zero padding before frame 0) are much quieter than the rest.

    .venv/bin/python experiments/latent_stats.py models/shapes-cd-tiny models/shapes-apt-tiny
    .venv/bin/python experiments/latent_stats.py models/shapes-teacher-tiny --steps 25   # Euler, the model's CFG and shift
"""

from __future__ import annotations

import argparse

import torch

from aptserve.engines import sampling
from aptserve.engines.loading import load_components
from aptserve.training.latents import LatentSet, renormalise
from aptserve.training.stage_apt import generate


def difference_energy(x: torch.Tensor) -> float:
    return sum(x.diff(dim=d).pow(2).mean().item() for d in (-3, -2, -1))


def frame_stds(x: torch.Tensor) -> str:
    """Std of latent frames 0, 1 and 2 and of the rest together (latents are (B, C, T, H, W))."""
    parts = [x[:, :, i] for i in range(3)] + [x[:, :, 3:]]
    return " | ".join(f"{part.std().item():.2f}" for part in parts)


def sample(dit, config, noise, text, mask, empty, steps: int) -> torch.Tensor:
    """One step (G(z) = z - v(z, t=1)), or Euler over `steps` with the checkpoint's CFG scale and shift."""
    if steps == 1:
        return generate(dit, noise, text, mask)
    velocity = sampling.guided(
        lambda x, t: dit(x, t, text, mask), lambda x, t: dit(x, t, *empty), config.guidance_scale
    )
    return sampling.euler(velocity, noise, steps, config.sample_shift)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="checkpoints to sample from")
    parser.add_argument("--latents", default="runs/latents-tiny.pt")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1, help="1: one step; more: Euler with the model's CFG")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = LatentSet.load(args.latents)
    real, text, mask = data.batch(torch.randint(len(data), (args.samples,)))
    noise = torch.randn_like(real)
    print(f"{args.samples} training prompts, seed {args.seed}, {args.steps} step(s)")
    channel_std = real[:, :, 3:].transpose(0, 1).flatten(1).std(dim=1)  # (C,) over frames 3+
    print(f"real latents, std per channel over frames 3+: {channel_std.min():.2f} to {channel_std.max():.2f}")
    print("| latents | std | difference energy | std, frame 0 | frame 1 | frame 2 | frames 3+ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| real | {real.std().item():.3f} | {difference_energy(real):.3f} | {frame_stds(real)} |")
    for name in args.models:
        config, modules = load_components(name, ("dit",))
        with torch.no_grad():
            fake = sample(modules["dit"].eval(), config, noise, text, mask, data.empty_text(args.samples), args.steps)
        # generated in the model's own latent normalisation, compared in the real latents'
        fake = renormalise(fake, config.vae.normalisation, data.normalisation)
        print(f"| {name} | {fake.std().item():.3f} | {difference_energy(fake):.3f} | {frame_stds(fake)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
