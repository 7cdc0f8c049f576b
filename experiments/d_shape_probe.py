"""Does an APT run's discriminator read shape, on real clips and on its generator's? For clips of each shape it rates
every clip under its own short caption ("a red circle moving left") and under the same caption with each other shape,
at D's timestep ensemble or at fixed timesteps (`--t`), and prints, per clip kind and prompted shape, the share of
clips whose own caption D rates highest and D's mean logit under each shape's caption. If D picks the right shape on
real clips but not on generated ones, the generator's clips carry no shape D can read, and D's gradient is all that
could teach it one.

    .venv/bin/python experiments/d_shape_probe.py --config configs/apt_open_shapeneg_tiny.json --clips 32
    .venv/bin/python experiments/d_shape_probe.py --config configs/apt_tiny.json --t 0.02 0.1 0.3 0.7
"""

from __future__ import annotations

import argparse
import time

import torch

from aptserve.engines.loading import load_components, load_text_encoder
from aptserve.training.common import load_stage_config
from aptserve.training.data import SHAPES, caption_of, named_attributes
from aptserve.training.discriminator import sample_d_timesteps
from aptserve.training.latents import LatentSet, encode_captions
from aptserve.training.stage_apt import APTStageConfig, generate, make_parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/apt_tiny.json", help="the run's APT config (its `out` holds D)")
    parser.add_argument("--clips", type=int, default=32, help="clips per prompted shape")
    parser.add_argument("--draws", type=int, default=4, help="D timesteps per clip, averaged")
    parser.add_argument(
        "--t", type=float, nargs="+", help="rate at these fixed D timesteps, a table each (default: D's ensemble)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = load_stage_config(APTStageConfig, args.config)
    began = time.perf_counter()
    torch.manual_seed(args.seed)
    teacher_config, teacher = load_components(cfg.teacher, ("dit",))
    _, student = load_components(cfg.generator, ("dit",))
    parts = make_parts(teacher["dit"], student["dit"], cfg)
    state = torch.load(f"{cfg.out}/state.pt", map_location="cpu", weights_only=False)
    parts.load_state_dict(state["stage"])
    parts.disc.eval()
    parts.generator.eval()
    data = LatentSet.load(cfg.latents).normalised_as(teacher_config.vae)

    named = [named_attributes(data.captions[int(i)]) for i in data.caption_ids]
    picks = {s: [i for i, n in enumerate(named) if n.get("shape") == s][: args.clips] for s in SHAPES}
    indices = [i for s in SHAPES for i in picks[s]]
    prompted = [named[i]["shape"] for i in indices]
    variants = [[caption_of(named[i]["colour"], s, named[i]["motion"]) for s in SHAPES] for i in indices]
    encoder = load_text_encoder(teacher_config.text)
    flat = [c for row in variants for c in row]
    tokens, mask = encode_captions(encoder, flat)
    tokens, mask = (
        tokens.float().view(len(indices), len(SHAPES), *tokens.shape[1:]),
        mask.view(len(indices), -1, mask.shape[-1]),
    )
    own = torch.tensor([SHAPES.index(s) for s in prompted])
    real = data.latents[torch.tensor(indices)].float()
    own_text, own_mask = tokens[torch.arange(len(indices)), own], mask[torch.arange(len(indices)), own]
    with torch.no_grad():
        fake = torch.cat(
            [
                generate(
                    parts.generator, torch.randn_like(real[i : i + 16]), own_text[i : i + 16], own_mask[i : i + 16]
                )
                for i in range(0, len(indices), 16)
            ]
        )
        for fixed in args.t or [None]:
            if fixed is not None:
                print(f"\nD timestep t = {fixed:g}\n")
            print(
                "| clips | prompted shape | n | own caption rated highest | D's mean logit per caption shape"
                f" ({', '.join(SHAPES)}) |"
            )
            print("|---|---|---:|---:|---|")
            for kind, clips in (("real", real), ("generated", fake)):
                logits = torch.zeros(len(indices), len(SHAPES))
                draws = args.draws if fixed is None else 1
                for _ in range(draws):
                    if fixed is None:
                        t = sample_d_timesteps(len(indices), cfg.d_shift)
                    else:
                        t = torch.full((len(indices),), fixed)
                    for k in range(len(SHAPES)):
                        rated = [
                            parts.disc(clips[i : i + 16], t[i : i + 16], tokens[i : i + 16, k], mask[i : i + 16, k])
                            for i in range(0, len(indices), 16)
                        ]
                        logits[:, k] += torch.cat(rated) / draws
                for s in SHAPES:
                    rows = own == SHAPES.index(s)
                    right = (logits[rows].argmax(dim=1) == SHAPES.index(s)).float().mean()
                    means = ", ".join(f"{v:+.2f}" for v in logits[rows].mean(dim=0).tolist())
                    print(f"| {kind} | {s} | {int(rows.sum())} | {100 * right:.0f}% | {means} |")
    print(f"({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
