"""Can the discriminator learn to tell shapes apart by the caption at all? Trains an APT run's D alone, no generator,
as a matching classifier on real clips of the given shapes: each clip under its own caption is a positive, the same
caption with the shape swapped (circle <-> square for two shapes) a negative, softplus losses as D's. Every
`--eval-every` updates it rates held-out clips (never trained on) under both captions at fixed timestep draws and
prints the share whose own caption scores higher and the mean logit gap. If this does not rise well above 50% within
a few hundred updates, D does not learn to read shape by the caption (whether the latents carry it:
`latent_shape_probe.py`), and its gradient cannot teach G shape.

    .venv/bin/python experiments/d_matching.py --config configs/apt_pairs_tiny.json --steps 200
"""

from __future__ import annotations

import argparse
import time

import torch

from aptserve.engines.loading import load_components
from aptserve.training.common import load_stage_config
from aptserve.training.data import named_attributes
from aptserve.training.discriminator import d_adversarial_loss, sample_d_timesteps
from aptserve.training.latents import LatentSet
from aptserve.training.stage_apt import APTStageConfig, make_optimizer, make_parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/apt_pairs_tiny.json", help="APT config whose `out` holds D")
    parser.add_argument("--fresh", action="store_true", help="start D from the teacher, not the run's state")
    parser.add_argument("--shapes", nargs=2, default=["circle", "square"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--held-out", type=int, default=64, help="clips per shape kept out of training")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--t", type=float, nargs="+", help="fixed D timesteps to train and rate at (default: D's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_stage_config(APTStageConfig, args.config)
    teacher_config, teacher = load_components(cfg.teacher, ("dit",))
    _, student = load_components(cfg.generator, ("dit",))
    parts = make_parts(teacher["dit"], student["dit"], cfg)
    if not args.fresh:
        parts.disc.load_state_dict(
            torch.load(f"{cfg.out}/state.pt", map_location="cpu", weights_only=False)["stage"]["disc"]
        )
    disc = parts.disc.train()
    opt = make_optimizer(disc.parameters(), args.lr, cfg)
    data = LatentSet.load(cfg.latents)
    if data.swapped_ids is None:
        raise SystemExit(f"{cfg.latents} has no swapped captions: run an APT stage with swapped negatives once")
    data = data.normalised_as(teacher_config.vae)

    shapes = [named_attributes(data.captions[int(i)]).get("shape") for i in data.caption_ids]
    by_shape = {s: [i for i, v in enumerate(shapes) if v == s] for s in args.shapes}
    held = torch.tensor([i for s in args.shapes for i in by_shape[s][: args.held_out]])
    train = torch.tensor([i for s in args.shapes for i in by_shape[s][args.held_out :]])
    pairs = (tuple(args.shapes),)

    def timesteps(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if args.t:
            return torch.tensor(args.t)[torch.randint(len(args.t), (n,), generator=generator)]
        return sample_d_timesteps(n, cfg.d_shift, generator)

    def rate(indices: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = data.caption_ids[indices]
        wrong_text, wrong_mask = data.swapped(rows, ("shape",), pairs)
        x = data.latents[indices].float()
        logits = disc(
            torch.cat([x, x]),
            t.repeat(2),
            torch.cat([data.text_tokens[rows].float(), wrong_text]),
            torch.cat([data.text_mask[rows], wrong_mask]),
        )
        return logits.chunk(2)

    def evaluate(step: int) -> None:
        disc.eval()
        generator = torch.Generator().manual_seed(1234)
        gaps = []
        with torch.no_grad():
            for _ in range(2):
                t = timesteps(len(held), generator)
                for i in range(0, len(held), 32):
                    own, wrong = rate(held[i : i + 32], t[i : i + 32])
                    gaps.append(own - wrong)
        gap = torch.cat(gaps)
        n = len(held)
        per_shape = [
            f"{s} {100 * (gap.view(2, n)[:, k * args.held_out : (k + 1) * args.held_out] > 0).float().mean():.0f}%"
            for k, s in enumerate(args.shapes)
        ]
        print(
            f"| {step} | {100 * (gap > 0).float().mean():.1f}% | {', '.join(per_shape)} | {gap.mean():+.3f} |"
            f" {time.perf_counter() - began:.0f} |",
            flush=True,
        )
        disc.train()

    print(f"{len(train)} training clips, {len(held)} held out; lr {args.lr}, batch {args.batch}")
    print("| updates | own caption higher (held out) | per shape | mean gap | seconds |\n|---:|---:|---|---:|---:|")
    began = time.perf_counter()
    evaluate(0)
    for step in range(1, args.steps + 1):
        indices = train[torch.randint(len(train), (args.batch,))]
        own, wrong = rate(indices, timesteps(args.batch))
        loss = d_adversarial_loss(own, wrong, "nonsaturating")  # the own caption a real, the swapped one a fake
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            evaluate(step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
