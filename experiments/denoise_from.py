"""Where in the sampling trajectory does a teacher lose shape, colour and motion? Real held-out clips are encoded
with the teacher's VAE, noised to time t0 (x_t0 = (1 - t0) x0 + t0 eps), and integrated back to t = 0 with the
teacher (Euler on the checkpoint's shifted schedule restricted to [0, t0], with its CFG scale), then decoded and
scored by the analyzer. t0 = 1 is plain sampling from noise; a low t0 keeps the real clip's layout and asks the
model only for the details.

    .venv/bin/python experiments/denoise_from.py models/shapes-teacher-tiny --t0 0.25 0.5 0.75 1 --clips 64
"""

from __future__ import annotations

import argparse
import itertools

import torch

from aptserve.engines import sampling
from aptserve.engines.loading import load_components, load_text_encoder
from aptserve.engines.pipeline import to_uint8
from aptserve.evaluation.analyzer import ATTRIBUTES, adherence, analyze
from aptserve.evaluation.generate import eval_specs, rendered_batches
from aptserve.evaluation.metrics import accuracy
from aptserve.training.data import to_tensor


def schedule_from(t0: float, steps: int, shift: float) -> list[float]:
    """The checkpoint's `steps`-interval schedule, cut at t0 (t0 itself prepended): 1 -> 0 for t0 = 1."""
    ts = [t for t in sampling.timesteps(steps, shift).tolist() if t < t0]
    return [t0, *ts]


def guided_velocity(dit, text, mask, empty, empty_mask, scale: float) -> sampling.Velocity:
    return sampling.guided(lambda x, t: dit(x, t, text, mask), lambda x, t: dit(x, t, empty, empty_mask), scale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="teacher checkpoint folder")
    parser.add_argument("--t0", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25, help="intervals of the full 1 -> 0 schedule")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale; default: the checkpoint's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if any(not 0 < t <= 1 for t in args.t0):
        parser.error(f"--t0 values must lie in (0, 1]; got {args.t0}")
    torch.set_grad_enabled(False)
    config, modules = load_components(args.model, ("dit", "vae"))
    dit, vae = modules["dit"].eval(), modules["vae"].eval()
    encoder = load_text_encoder(config.text)
    scale = config.guidance_scale if args.guidance is None else args.guidance
    specs = eval_specs(args.clips, args.seed)
    hits: dict[float, list[dict[str, bool]]] = {t: [] for t in args.t0}
    generator = torch.Generator().manual_seed(args.seed)
    for batch, clips in rendered_batches(specs, 49, 64, 64, args.batch):
        x0 = vae.encode(torch.stack([to_tensor(clip) for clip in clips]))  # (B, C, L, h, w), normalised
        eps = torch.randn(x0.shape, generator=generator)
        text, mask = encoder.encode([s.caption for s in batch])
        empty, empty_mask = encoder.encode([""] * len(batch))
        velocity = guided_velocity(dit, text, mask, empty, empty_mask, scale)
        for t0 in args.t0:
            x = (1 - t0) * x0 + t0 * eps
            for t_cur, t_next in itertools.pairwise(schedule_from(t0, args.steps, config.sample_shift)):
                x = x + (t_next - t_cur) * velocity(x, torch.full((x.shape[0],), t_cur))
            hits[t0] += [adherence(analyze(clip), spec) for clip, spec in zip(to_uint8(vae.decode(x)), batch)]
    print(
        f"{args.model}: {args.clips} held-out clips (seed {args.seed}), 49 frames at 64x64, CFG {scale:g}, "
        f"{args.steps}-step schedule with shift {config.sample_shift:g}, cut at t0"
    )
    print("| t0 | steps run | " + " | ".join(ATTRIBUTES) + " | all |")
    print("|---:|---:|" + "---:|" * (len(ATTRIBUTES) + 1))
    for t0 in args.t0:
        acc = accuracy(hits[t0])
        cells = " | ".join(f"{100 * acc[name]:.1f}%" for name in (*ATTRIBUTES, "all"))
        print(f"| {t0:g} | {len(schedule_from(t0, args.steps, config.sample_shift)) - 1} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
