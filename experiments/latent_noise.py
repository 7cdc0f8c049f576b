"""How precise must a generator's latents be for the analyzer to read shape and motion back? Real held-out clips
are encoded with the VAE, Gaussian noise of standard deviation sigma (in normalised latent units, where real
latents have std ~1) is added, and the decoded clips are scored. sigma 0 is the VAE round trip.

    .venv/bin/python experiments/latent_noise.py --vae models/shapes-vae-tiny --clips 64 --sigmas 0 0.1 0.2 0.3 0.5
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from aptserve.engines.loading import load_components
from aptserve.engines.pipeline import to_uint8
from aptserve.evaluation.analyzer import ATTRIBUTES, adherence, analyze
from aptserve.evaluation.generate import eval_specs, rendered_batches
from aptserve.evaluation.metrics import accuracy
from aptserve.training.data import to_tensor


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="models/shapes-vae-tiny")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, modules = load_components(args.vae, ("vae",))
    vae = modules["vae"].eval()
    specs = eval_specs(args.clips, args.seed)
    hits: dict[float, list[dict[str, bool]]] = {s: [] for s in args.sigmas}
    quality: dict[float, list[float]] = {s: [] for s in args.sigmas}
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for batch, clips in rendered_batches(specs, 49, 64, 64, args.batch):
            latent = vae.encode(torch.stack([to_tensor(clip) for clip in clips]))  # (B, C, L, h, w), normalised
            noise = torch.randn(latent.shape, generator=generator)
            for sigma in args.sigmas:
                decoded = to_uint8(vae.decode(latent + sigma * noise))
                hits[sigma] += [adherence(analyze(clip), spec) for clip, spec in zip(decoded, batch)]
                quality[sigma] += [psnr(a, b) for a, b in zip(decoded, clips)]
    print(f"{args.clips} held-out clips (seed {args.seed}), 49 frames at 64x64, {args.vae}")
    print("| latent noise sigma | PSNR (dB) | " + " | ".join(ATTRIBUTES) + " | all |")
    print("|---:|---:|" + "---:|" * (len(ATTRIBUTES) + 1))
    for sigma in args.sigmas:
        acc = accuracy(hits[sigma])
        cells = " | ".join(f"{100 * acc[name]:.1f}%" for name in (*ATTRIBUTES, "all"))
        print(f"| {sigma:g} | {np.mean(quality[sigma]):.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
