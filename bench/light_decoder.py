"""Light decoder vs full decoder: how close its frames are (PSNR against the full decoder's, on held-out latents of
real clips and of generated clips) and how much faster it streams a 2 s clip on this CPU.

    python bench/light_decoder.py [--model shapes-apt-tiny] [--clips 32] [--repeats 9] [--threads 2]

PSNR is over uint8 frames (as served, after `to_uint8`), one value per clip, decoded chunk by chunk as the server
does; the interval is a bootstrap 90% interval of the mean over clips. Decode times are medians of interleaved
repeats of the streaming decode (decode_chunk + to_uint8 per latent frame) of one 2 s clip.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from harness import machine_line, markdown_table

from aptserve.engines.loading import load_light_decoder
from aptserve.engines.pipeline import Pipeline, to_uint8
from aptserve.engines.vae import CausalVAE
from aptserve.training.data import shapes_sample, to_tensor


def stream(vae: CausalVAE, latent: torch.Tensor) -> np.ndarray:
    """(B, C, L, h, w) -> (B, F, H, W, 3) uint8, one latent frame at a time as the server decodes."""
    return np.concatenate([to_uint8(chunk) for chunk in vae.decode_chunks(latent)], axis=1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def bootstrap_mean(values: np.ndarray, level: float = 0.9, resamples: int = 10_000, seed: int = 0):
    """Mean and bootstrap percentile interval of the mean."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@torch.inference_mode()
def held_out_latents(pipeline: Pipeline, clips: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of `clips` held-out shapes clips (encoded by the model's VAE) and latents the generator makes in one
    step for the same held-out captions (seeds 0..clips-1): (N, C, L, h, w) each."""
    samples = [shapes_sample(seed, i, held_out=True) for i in range(clips)]
    real = torch.cat([pipeline.vae.encode(to_tensor(video)[None]) for video, _ in samples])
    prompts = [spec.caption for _, spec in samples]
    generated = []
    for start in range(0, clips, 8):
        request = pipeline.request(prompts[start : start + 8], list(range(start, min(start + 8, clips))))
        text, mask = pipeline.encode_text(pipeline.complete_prompts(request).prompts)
        generated.append(pipeline.denoise(request, text, mask))
    return real, torch.cat(generated)


@torch.inference_mode()
def clip_psnrs(full: CausalVAE, light: CausalVAE, latents: torch.Tensor) -> np.ndarray:
    return np.array([psnr(stream(full, z[None]), stream(light, z[None])) for z in latents])


@torch.inference_mode()
def decode_times(full: CausalVAE, light: CausalVAE, latent: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per streaming decode of `latent`, full and light interleaved (order alternating) after a warm-up."""
    vaes = {"full": full, "light": light}
    for vae in vaes.values():
        stream(vae, latent)
    times: dict[str, list[float]] = {"full": [], "light": []}
    for r in range(repeats):
        for name in ("full", "light") if r % 2 == 0 else ("light", "full"):
            start = time.perf_counter()
            stream(vaes[name], latent)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-apt-tiny")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips per latent source")
    parser.add_argument("--seed", type=int, default=0, help="held-out data seed")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipeline = Pipeline.from_name(args.model)
    full = pipeline.vae
    light = load_light_decoder(pipeline.config, pipeline.model.source).eval()
    real, generated = held_out_latents(pipeline, args.clips, args.seed)
    scores = {"real clips": clip_psnrs(full, light, real), "generated": clip_psnrs(full, light, generated)}
    scores["all"] = np.concatenate(list(scores.values()))
    times = decode_times(full, light, generated[:1], args.repeats)
    median = {name: float(np.median(t)) for name, t in times.items()}
    ratios = np.array(times["full"]) / np.array(times["light"])

    frames = full.config.frames_for_latents(generated.shape[2])
    height, width = 8 * generated.shape[3], 8 * generated.shape[4]
    params = {
        name: sum(p.numel() for p in vae.decoder.parameters()) for name, vae in (("full", full), ("light", light))
    }
    print(machine_line(args.threads))
    print(
        f"model {args.model}, light decoder {pipeline.config.light_decoder}; held-out prompts (seed {args.seed}); "
        f"{frames} frames at {width}x{height} ({(frames - 1) / pipeline.config.fps:.0f} s), streaming decode"
    )
    print()
    paired = f"{ratios.min():.2f} .. {ratios.max():.2f} (paired range)"
    rows = []
    for name, values in scores.items():
        mean, lo, hi = bootstrap_mean(values)
        rows.append((f"PSNR light vs full, {name} (dB)", f"{mean:.2f}", f"{lo:.2f} .. {hi:.2f}", len(values)))
    rows += [
        ("streaming decode, full (s, median)", f"{median['full']:.3f}", "", args.repeats),
        ("streaming decode, light (s, median)", f"{median['light']:.3f}", "", args.repeats),
        ("speed-up full / light", f"{median['full'] / median['light']:.2f}x", paired, args.repeats),
        ("decoder parameters, full / light", f"{params['full']:,} / {params['light']:,}", "", ""),
    ]
    print(markdown_table(("measure", "value", "90% interval", "n"), rows))


if __name__ == "__main__":
    main()
