"""The `aptserve` command line. Subcommands import their heavy dependencies lazily so `--help` is instant."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

log = logging.getLogger("aptserve")


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate one clip to an MP4 file")
    p.add_argument("prompt", help="text prompt")
    p.add_argument("-o", "--output", type=Path, default=Path("out.mp4"), help="MP4 file to write (default out.mp4)")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder, name under models/, or preset (default: "
        "models/shapes-apt-tiny when present, else the random-weight tiny preset)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 16 (default: the model's)")
    p.add_argument("--seconds", type=float, default=2.0, help="clip length; frames = 4*latents - 3 (2 s -> 49)")
    p.add_argument("--steps", type=int, default=None, help="1 (APT), 2 (zero-shot two step) or more (teacher)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale for many-step sampling")
    p.add_argument(
        "--no-prompt-completion",
        dest="complete_prompt",
        action="store_false",
        help="encode the prompt as written, not completed by the model's caption grammar",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--decoder", choices=("full", "light"), default="full", help="the model's distilled light decoder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from aptserve.engines.loading import default_model
    from aptserve.engines.pipeline import Pipeline, resolve_device
    from aptserve.media.encoder import FragmentedMP4Encoder

    args.model = args.model or default_model()
    device, dtype = resolve_device(args.device, args.dtype)
    with tqdm(total=None, desc=f"loading {args.model}", disable=args.no_progress, unit="chunk") as bar:
        pipeline = Pipeline.from_name(args.model, device, dtype, decoder=args.decoder)
        request = pipeline.request(
            args.prompt, args.seed, args.size, args.seconds, args.steps,
            guidance_scale=args.guidance, complete_prompts=args.complete_prompt,
        )  # fmt: skip
        request = pipeline.complete_prompts(request)
        if request.prompts[0] != args.prompt:
            log.info("prompt completed by the model's caption grammar: %r", request.prompts[0])
        bar.reset(total=pipeline.num_chunks(request))
        bar.set_description("text + DiT")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(args.output, "wb") as out,
            FragmentedMP4Encoder(request.width, request.height, pipeline.config.fps) as enc,
        ):
            for chunk in pipeline.generate(request):
                bar.set_description("decode + encode")
                for piece in enc.write(chunk.frames[0]):
                    out.write(piece)
                bar.update(1)
                timings = chunk.timings
            for piece in enc.close():
                out.write(piece)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    log.info(
        "wrote %s: %d frames %dx%d at %d fps (%s)",
        args.output,
        request.frames,
        request.width,
        request.height,
        pipeline.config.fps,
        stages,
    )
    return 0


def add_analyze_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="read colour, shape and motion of a shapes clip back from its frames")
    p.add_argument("clips", nargs="+", type=Path, help="MP4 files")
    p.add_argument("--prompt", default=None, help="score the reading against the attributes this prompt names")
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """One JSON line per clip: the analyzer's reading and, with --prompt, whether each named attribute matches.
    Exits 1 when a clip misses an attribute its prompt names."""
    import dataclasses
    import json

    import av
    import numpy as np

    from aptserve.evaluation.analyzer import analyze
    from aptserve.training.data import named_attributes

    expected = named_attributes(args.prompt) if args.prompt else {}
    missed = False
    for path in args.clips:
        with av.open(str(path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        reading = dataclasses.asdict(analyze(frames))
        line = {"clip": str(path), "frames": len(frames), **reading}
        if expected:
            line["matches"] = {name: reading[name] == value for name, value in expected.items()}
            missed |= not all(line["matches"].values())
        sys.stdout.write(json.dumps(line) + "\n")
    return 1 if missed else 0


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    from aptserve.server.settings import add_settings_arguments

    p = subparsers.add_parser("serve", help="run the HTTP/WebSocket server (settings also from APTSERVE_* env vars)")
    add_settings_arguments(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from aptserve.server.app import create_app
    from aptserve.server.edge import uvicorn_config
    from aptserve.server.settings import settings_from_args

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise ValueError(str(exc)) from exc
    uvicorn.Server(uvicorn_config(create_app(settings))).run()
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from aptserve.training import STAGES

    p = subparsers.add_parser("train", help="run one stage of the APT recipe (resumes from its run folder)")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--config", type=Path, default=None, help="JSON stage config (see configs/)")
    p.add_argument("--steps", type=int, default=None, help="override the config's step count")
    p.add_argument("--out", default=None, help="run folder (state.pt, losses.csv); rerunning resumes")
    p.add_argument("--export", default=None, help="checkpoint folder written at the end")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from aptserve.training import stage
    from aptserve.training.common import load_stage_config

    config_cls, train = stage(args.stage)
    overrides = {"steps": args.steps, "out": args.out, "export": args.export}
    if "threads" in {f.name for f in dataclasses.fields(config_cls)}:  # stages that set threads themselves
        overrides["threads"] = args.threads
    cfg = load_stage_config(config_cls, args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(cfg, progress=not args.no_progress)
    log.info("%s stage: %s", args.stage, result)
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score systems on held-out prompts: adherence, Frechet distance, sharpness")
    p.add_argument("--config", type=Path, default=None, help="JSON eval config (see configs/eval_tiny.json)")
    p.add_argument("--prompts", type=int, default=None, help="number of held-out prompts")
    p.add_argument("--out", default=None, help="markdown table to write")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--systems",
        nargs="+",
        default=(),
        metavar="NAME",
        help="generate only these systems (by name); the others come from the cache or are skipped",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from aptserve.evaluation.config import EvalConfig
    from aptserve.evaluation.report import run_eval as evaluate
    from aptserve.training.common import load_stage_config

    cfg = load_stage_config(EvalConfig, args.config, {"prompts": args.prompts, "out": args.out})
    if args.threads:
        torch.set_num_threads(args.threads)
    log.info("wrote %s", evaluate(cfg, progress=not args.no_progress, only=tuple(args.systems)))
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export the generator and VAE decoder for another runtime")
    formats = p.add_subparsers(dest="format", required=True)
    o = formats.add_parser(
        "onnx",
        help="ONNX graphs at one static shape bucket (TensorRT's input): dit.onnx, decoder chunks, manifest.json",
    )
    o.add_argument(
        "--model", default=None, help="checkpoint folder, name under models/, or preset (default: as generate)"
    )
    o.add_argument("--bucket", required=True, help="WIDTHxHEIGHTxFRAMES, e.g. 1280x720x49 (frames = 4*latents - 3)")
    o.add_argument("--batch", type=int, default=1)
    o.add_argument("--fp8", action="store_true", help="FP8 linears as QuantizeLinear/DequantizeLinear (e4m3)")
    o.add_argument(
        "--bf16-blocks",
        type=int,
        nargs="+",
        default=(),
        help="generator blocks kept out of FP8 (the server's bf16_blocks)",
    )
    o.add_argument(
        "--attention", choices=("sdpa", "plugin"), default="sdpa", help="standard ops, or the TensorRT plugin node"
    )
    o.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="float32 is what onnxruntime checks; bfloat16 is for TensorRT (ONNX's Conv takes it from opset 22 only)",
    )
    o.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    o.add_argument("--no-progress", action="store_true")
    o.set_defaults(func=run_export_onnx)


def run_export_onnx(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from aptserve.engines.loading import default_model
    from aptserve.engines.onnx_export import EXPORT_DTYPES, export_model, parse_bucket

    bucket = parse_bucket(args.bucket, args.batch)
    with tqdm(total=2, desc="loading", disable=args.no_progress, unit="graph") as bar:

        def step(name: str) -> None:  # called as each graph (generator, decoder) starts
            bar.set_description(f"exporting {name}")
            bar.update(1)

        manifest = export_model(
            args.model or default_model(), bucket, args.output, fp8=args.fp8, fp8_keep_blocks=args.bf16_blocks,
            attention=args.attention, dtype=EXPORT_DTYPES[args.dtype], progress=step,
        )  # fmt: skip
    log.info("wrote %s: %s", args.output, ", ".join(g["file"] for g in manifest["graphs"].values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aptserve", description="One-step text-to-video: generate, serve, bench.")
    parser.add_argument("-v", "--verbose", action="store_true")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_serve_parser(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_analyze_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ValueError as exc:  # bad user input: say what, no traceback
        parser.exit(2, f"aptserve {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
