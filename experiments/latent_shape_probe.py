"""Is the shape in the clean VAE latents, where D reads them? Trains two small shape classifiers on the training
latents (no captions) and prints their held-out accuracy as they learn: one sees only what one backbone token sees (a
linear patch embedding of 1x2x2 latent pixels, then per-token layers, max-pooled), the other 3x3 convolutions at the
latent's own resolution (the features of `discriminator.MatchingBranch`). If both reach high accuracy, the shape is
there, and a discriminator that cannot tell a circle from a square by the caption fails to learn it, not to see it.

    .venv/bin/python experiments/latent_shape_probe.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from aptserve.engines.loading import load_components
from aptserve.training.data import SHAPES, named_attributes
from aptserve.training.discriminator import MatchingBranch
from aptserve.training.latents import LatentSet


def classifiers(channels: int) -> dict[str, nn.Module]:
    return {
        "one token's view (patch 1x2x2, per-token MLP)": nn.Sequential(
            nn.Conv3d(channels, 256, (1, 2, 2), stride=(1, 2, 2)),
            nn.GELU(),
            nn.Conv3d(256, 256, 1),
            nn.GELU(),
            nn.AdaptiveMaxPool3d(1),
            nn.Flatten(),
            nn.Linear(256, len(SHAPES)),
        ),
        "3x3 convolutions at latent resolution (D's matching branch)": BranchClassifier(channels),
    }


class BranchClassifier(nn.Module):
    """The features of D's matching branch, read by a linear layer instead of the caption."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = MatchingBranch(channels, text_dim=1)
        self.out = nn.Linear(self.branch.width, len(SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.branch.features(x))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", default="runs/latents-tiny.pt")
    parser.add_argument("--model", default="models/shapes-teacher-tiny", help="whose latent normalisation to use")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config, _ = load_components(args.model, ())
    data = LatentSet.load(args.latents).normalised_as(config.vae)
    shapes = [named_attributes(data.captions[int(i)]).get("shape") for i in data.caption_ids]
    keep = torch.tensor([i for i, s in enumerate(shapes) if s in SHAPES])
    labels = torch.tensor([SHAPES.index(shapes[i]) for i in keep.tolist()])
    x = data.latents[keep].float()
    order = torch.randperm(len(keep))
    train, held = order[: -args.held_out], order[-args.held_out :]
    pair = labels[held] < 2  # circles and squares
    print(f"{len(train)} training clips, {len(held)} held out ({int(pair.sum())} circles and squares)\n")
    print("| classifier | updates | held out, 4 shapes | circle vs square | seconds |\n|---|---:|---:|---:|---:|")
    for name, net in classifiers(x.shape[1]).items():
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        began = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = train[torch.randint(len(train), (64,))]
            loss = F.cross_entropy(net(x[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % (args.steps // 3) == 0:
                with torch.no_grad():
                    right = net(x[held]).argmax(dim=1) == labels[held]
                print(
                    f"| {name} | {step} | {100 * right.float().mean():.1f}% | {100 * right[pair].float().mean():.1f}% |"
                    f" {time.perf_counter() - began:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
