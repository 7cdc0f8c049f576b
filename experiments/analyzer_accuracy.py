"""Accuracy of the shapes analyzer (colour, shape, motion read back from frames) on rendered held-out clips,
clean and degraded the way generated clips are (blur, noise, softening).

    python experiments/analyzer_accuracy.py [--prompts 256]
"""

from __future__ import annotations

import argparse

import numpy as np

from aptserve.evaluation.analyzer import adherence, analyze, degrade
from aptserve.evaluation.generate import eval_specs
from aptserve.training.data import render

LEVELS = {"clean": None, "blur 1, noise 6, 2x soften": (1.0, 6.0, 2), "blur 2, noise 12, 2x soften": (2.0, 12.0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    specs = eval_specs(args.prompts, args.seed)
    print(f"{len(specs)} held-out prompts, 49 frames at 64x64")
    print()
    print("| clips | colour | shape | motion | all three |")
    print("|---|---:|---:|---:|---:|")
    for name, level in LEVELS.items():
        rng = np.random.default_rng(args.seed)
        scores = []
        for spec in specs:
            video = render(spec, 49, 64, 64)
            if level is not None:
                video = degrade(video, rng, blur=level[0], noise=level[1], soften=level[2])
            scores.append(adherence(analyze(video), spec))
        mean = {k: np.mean([s[k] for s in scores]) for k in ("colour", "shape", "motion", "all")}
        print(f"| {name} | {mean['colour']:.1%} | {mean['shape']:.1%} | {mean['motion']:.1%} | {mean['all']:.1%} |")


if __name__ == "__main__":
    main()
