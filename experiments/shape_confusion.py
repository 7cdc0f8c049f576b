"""Which shapes does a model draw for which prompted shape? The evaluation's held-out prompts and generation seeds
(so the diagonal reproduces its shape column), each clip read back by the analyzer, tallied as a confusion matrix:
rows are the prompted shape, columns the shape read, cells the share of the row. `--by size` (or background,
speed) adds, per value of that caption attribute, the share of clips whose colour, shape and motion read as
prompted: which settings of the attributes a short prompt leaves open a model draws best. `vae` is the real clips after
the VAE round trip (the ceiling any generator behind that VAE has), `real` the rendered clips themselves.

    .venv/bin/python experiments/shape_confusion.py --prompts 256 \\
        vae=models/shapes-vae-tiny teacher=models/shapes-teacher-tiny:25:3 apt=models/shapes-apt-tiny:1
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from aptserve.engines.loading import load_components
from aptserve.engines.pipeline import to_uint8
from aptserve.evaluation.analyzer import Reading, adherence, analyze
from aptserve.evaluation.generate import PipelineCache, eval_specs, generation_seeds, rendered_batches
from aptserve.training.data import SHAPES, ShapeSpec, to_tensor


def parse_system(text: str) -> tuple[str, str, int | None, float | None]:
    """NAME=MODEL[:STEPS[:GUIDANCE]]; MODEL is `real`, a VAE folder (NAME `vae`) or a generator checkpoint."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL[:STEPS[:GUIDANCE]]; got {text!r}")
    model, *opts = rest.split(":")
    if len(opts) > 2:
        raise argparse.ArgumentTypeError(f"at most STEPS and GUIDANCE after the model; got {text!r}")
    steps = int(opts[0]) if opts else None
    guidance = float(opts[1]) if len(opts) > 1 else None
    return name, model, steps, guidance


def read_real(specs: list[ShapeSpec], vae_path: str | None, batch: int) -> list[Reading]:
    vae = load_components(vae_path, ("vae",))[1]["vae"].eval() if vae_path else None
    readings = []
    for _, clips in rendered_batches(specs, 49, 64, 64, batch):
        if vae is not None:
            clips = to_uint8(vae.decode(vae.encode(torch.stack([to_tensor(clip) for clip in clips]))))
        readings += [analyze(clip) for clip in clips]
    return readings


def read_generated(
    pipelines: PipelineCache,
    model: str,
    steps: int | None,
    guidance: float | None,
    specs: list[ShapeSpec],
    seed: int,
    batch: int,
) -> list[Reading]:
    pipeline = pipelines.get(model)
    if isinstance(pipeline, str):
        raise SystemExit(f"cannot load {model}: {pipeline}")
    seeds = generation_seeds(len(specs), seed)
    readings = []
    for start in range(0, len(specs), batch):
        chunk = specs[start : start + batch]
        request = pipeline.request(
            [s.caption for s in chunk], seeds[start : start + len(chunk)], size="64x64", seconds=2.0,
            steps=steps, guidance_scale=guidance,
        )  # fmt: skip
        clips, _ = pipeline.generate_video(request)
        readings += [analyze(clip) for clip in clips]
    return readings


def confusion_table(name: str, specs: list[ShapeSpec], read: list[str]) -> str:
    counts = Counter(zip([s.shape for s in specs], read))
    lines = [f"| {name}: prompted \\ read | " + " | ".join(SHAPES) + " | n |", "|---|" + "---:|" * (len(SHAPES) + 1)]
    for prompted in SHAPES:
        n = sum(counts[prompted, r] for r in SHAPES)
        cells = " | ".join(f"{100 * counts[prompted, r] / max(n, 1):.0f}%" for r in SHAPES)
        lines.append(f"| {prompted} | {cells} | {n} |")
    right = float(np.mean([s.shape == r for s, r in zip(specs, read)]))
    return "\n".join(lines) + f"\n\n{name}: shape read as prompted in {100 * right:.1f}% of {len(specs)} clips\n"


def breakdown_table(name: str, specs: list[ShapeSpec], readings: list[Reading], by: str) -> str:
    """Per value of the caption attribute `by`: how often colour, shape, motion and all three read as prompted."""
    lines = [f"| {name}: {by} | n | colour | shape | motion | all three |", "|---|---:|---:|---:|---:|---:|"]
    for value in sorted({getattr(s, by) for s in specs}):
        rows = [adherence(r, s) for s, r in zip(specs, readings) if getattr(s, by) == value]
        cells = " | ".join(
            f"{100 * np.mean([row[k] for row in rows]):.1f}%" for k in ("colour", "shape", "motion", "all")
        )
        lines.append(f"| {value} | {len(rows)} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("systems", nargs="+", type=parse_system, help="NAME=MODEL[:STEPS[:GUIDANCE]]")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's prompt seed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--by", choices=("size", "background", "speed"), help="also break adherence down by this")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    specs = eval_specs(args.prompts, args.seed)
    pipelines = PipelineCache("cpu")
    print(f"{args.prompts} held-out prompts (seed {args.seed}), 49 frames at 64x64, generation seeds as in the eval\n")
    for name, model, steps, guidance in args.systems:
        if model == "real":
            readings = read_real(specs, None, args.batch)
        elif name == "vae":
            readings = read_real(specs, model, args.batch)
        else:
            readings = read_generated(pipelines, model, steps, guidance, specs, args.seed, args.batch)
        print(confusion_table(name, specs, [r.shape for r in readings]))
        if args.by:
            print(breakdown_table(name, specs, readings, args.by))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
