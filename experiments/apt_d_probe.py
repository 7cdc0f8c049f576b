"""How fast can the APT discriminator learn to tell real latents from a frozen generator's? Trains D alone (G
fixed, as at the start of APT) for a few steps per setting and prints D's loss and the gap between its mean
logits on real and generated latents. A D that cannot leave 2 ln 2 = 1.386 gives G nothing to learn from.

    .venv/bin/python experiments/apt_d_probe.py --shifts 12 1 --steps 40
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from aptserve.engines.loading import load_components
from aptserve.training.latents import LatentSet
from aptserve.training.stage_apt import APTStageConfig, d_step, make_parts


def probe(cfg: APTStageConfig, data: LatentSet, steps: int) -> list[dict[str, float]]:
    torch.manual_seed(cfg.seed)
    teacher_config, teacher = load_components(cfg.teacher, ("dit",))
    _, student = load_components(cfg.generator, ("dit",))
    parts = make_parts(teacher["dit"], student["dit"], cfg)
    data = data.normalised_as(teacher_config.vae)
    return [d_step(parts, data, cfg) for _ in range(steps)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/apt_tiny.json")
    parser.add_argument("--shifts", type=float, nargs="+", default=[12.0, 1.0], help="D timestep shifts to try")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr-d", type=float, default=None)
    args = parser.parse_args()
    from aptserve.training.common import load_stage_config

    base = load_stage_config(APTStageConfig, args.config, {"lr_d": args.lr_d})
    data = LatentSet.load(base.latents)
    print(
        f"D alone, batch {base.batch_size}, lr {base.lr_d}, aR1 {base.use_r1}, {args.steps} steps; mean of each tenth"
    )
    print(
        "| D shift | "
        + " | ".join(f"steps {i * args.steps // 10 + 1}-{(i + 1) * args.steps // 10}" for i in range(10))
        + " | last: real - fake logit |"
    )
    print("|---|" + "---:|" * 11)
    for s in args.shifts:
        began = time.perf_counter()
        log = probe(dataclasses.replace(base, d_shift=s), data, args.steps)
        n = args.steps // 10
        means = [sum(r["d_loss"] for r in log[i * n : (i + 1) * n]) / n for i in range(10)]
        gap = sum(r["d_real"] - r["d_fake"] for r in log[-n:]) / n
        print(
            f"| {s:g} | "
            + " | ".join(f"{m:.3f}" for m in means)
            + f" | {gap:+.3f} |  ({time.perf_counter() - began:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
