"""How often does `aptserve generate PROMPT --seed S` read right under `aptserve analyze`, for seeds 0..N-1, as served
(the prompt completed by each checkpoint's caption grammar with the seed, each model at its own default steps and
guidance)? Prints, per checkpoint, the first 8 seeds' readings, the share of all N that read right with a 95% Wilson
interval, and that share by each attribute the completion drew (size, speed, background).

    .venv/bin/python experiments/prompt_seeds.py --seeds 48 \\
        models/shapes-teacher-tiny models/shapes-cd-tiny models/shapes-apt-tiny
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from aptserve.engines.pipeline import Pipeline
from aptserve.evaluation.analyzer import analyze
from aptserve.evaluation.metrics import wilson_interval
from aptserve.training.data import OPTIONAL_ATTRIBUTES, named_attributes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="checkpoint folders")
    parser.add_argument("--prompt", default="a red circle moving left")
    parser.add_argument("--seeds", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = named_attributes(args.prompt)
    for model in args.models:
        pipeline = Pipeline.from_name(model, "cpu", torch.float32)
        right, right_first, first, by_value = 0, 0, [], defaultdict(lambda: [0, 0])
        for seed in range(args.seeds):
            request = pipeline.complete_prompts(pipeline.request(args.prompt, seed))
            reading = analyze(pipeline.generate_video(request)[0][0])
            read = {name: getattr(reading, name) for name in wanted}
            ok = read == wanted
            right += ok
            if seed < 8:
                right_first += ok
                first.append(f"{seed}:{'/'.join(read.values())}{' ok' if ok else ''}")
            drawn = named_attributes(request.prompts[0])
            for name in OPTIONAL_ATTRIBUTES:
                if name in drawn and name not in wanted:
                    by_value[drawn[name]][0] += ok
                    by_value[drawn[name]][1] += 1
        low, high = wilson_interval(right, args.seeds)
        print(f"{model}: seeds 0-7 {right_first} of 8 ({', '.join(first)})")
        print(
            f"  all {right} of {args.seeds} = {right / args.seeds:.1%} (95% {low:.1%}-{high:.1%}); by drawn value: "
            + ", ".join(f"{v} {k[0]}/{k[1]}" for v, k in sorted(by_value.items()))
        )


if __name__ == "__main__":
    main()
