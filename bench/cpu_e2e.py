"""End-to-end CPU benchmark: per-stage times (text, DiT, VAE decode, MP4 encode) and total for one clip.

    python bench/cpu_e2e.py [--model tiny] [--size 64x64] [--seconds 2] [--repeats 7]

Prints a markdown table of medians over the repeats (after one warm-up), ready for docs/PERF.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from harness import machine_line, markdown_table, medians

from aptserve.engines.pipeline import Pipeline
from aptserve.media.encoder import FragmentedMP4Encoder


def run_once(pipeline: Pipeline, args: argparse.Namespace) -> dict[str, float]:
    pipeline.text_encoder._cache.clear()  # time the text encoder itself, not a cache hit
    request = pipeline.request(args.prompt, args.seed, args.size, args.seconds, args.steps)
    encode, size = 0.0, 0
    start = time.perf_counter()
    with FragmentedMP4Encoder(request.width, request.height, pipeline.config.fps) as encoder:
        for chunk in pipeline.generate(request):
            t0 = time.perf_counter()
            size += sum(len(piece) for piece in encoder.write(chunk.frames[0]))
            encode += time.perf_counter() - t0
        t0 = time.perf_counter()
        size += sum(len(piece) for piece in encoder.close())
        encode += time.perf_counter() - t0
    total = time.perf_counter() - start
    return {**chunk.timings, "encode": encode, "total": total, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", default=None)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a red circle moving left")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipeline = Pipeline.from_name(args.model)
    run_once(pipeline, args)  # warm-up: allocator, ffmpeg start, first-call paths
    runs = [run_once(pipeline, args) for _ in range(args.repeats)]
    med = medians(runs)

    request = pipeline.request(args.prompt, args.seed, args.size, args.seconds, args.steps)
    clip = (request.frames - 1) / pipeline.config.fps
    print(machine_line(args.threads))
    print(
        f"model {args.model}, {request.width}x{request.height}, {request.frames} frames ({clip:.2f} s of video), "
        f"{args.steps} step(s), median of {args.repeats}"
    )
    print()
    stages = ("text_encode", "dit", "vae_decode", "encode", "total")
    rows = [(stage, f"{med[stage]:.3f}", f"{med[stage] / med['total']:.0%}") for stage in stages]
    rows += [
        ("realtime factor (video s / wall s)", f"{clip / med['total']:.2f}", ""),
        ("MP4 bytes", int(med["bytes"]), ""),
    ]
    print(markdown_table(("stage", "median s", "share"), rows))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "medians": med}, indent=2))


if __name__ == "__main__":
    main()
