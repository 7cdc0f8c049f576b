"""The clips every system is scored on: the held-out prompts and generation seeds, their real renders, and each
system's generations through the serving pipeline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from aptserve.engines.config import frames_for_seconds, parse_size
from aptserve.engines.loading import load_components, load_model, load_text_encoder
from aptserve.engines.pipeline import Pipeline, to_uint8
from aptserve.engines.text import CachedTextEncoder
from aptserve.evaluation.classifier import ClipClassifier
from aptserve.evaluation.config import FPS, EvalConfig, SystemSpec
from aptserve.evaluation.scoring import ClipSet
from aptserve.training.data import (
    BACKGROUNDS,
    SIZES,
    SPEEDS,
    ShapeSpec,
    held_out_combinations,
    render,
    spec_for,
    to_tensor,
)


def eval_specs(count: int, seed: int, redraw: int = 0, open_attributes: bool = False) -> list[ShapeSpec]:
    """`count` held-out specs, one combination each (cycling once all are used), at seeded start positions;
    `redraw` > 0 keeps the combinations but draws new positions (a second real set). With `open_attributes` the
    attributes a short prompt leaves open (size, speed, background) are drawn uniformly for each spec as well."""
    combinations = held_out_combinations()
    order = np.random.default_rng(seed).permutation(len(combinations))
    specs = []
    for i in range(count):
        combination = combinations[order[i % len(order)]]
        if open_attributes:
            colour, shape, motion = combination[:3]
            rng = np.random.default_rng([seed, i, redraw, 1])
            background, size, speed = (str(rng.choice(list(v))) for v in (BACKGROUNDS, SIZES, SPEEDS))
            combination = (colour, shape, motion, background, size, speed)
        specs.append(spec_for(combination, np.random.default_rng([seed, i, redraw])))
    return specs


def prompt_specs(cfg: EvalConfig) -> list[ShapeSpec]:
    """The spec every generated clip is prompted with and scored against, draw after draw: (draws * prompts,)."""
    return eval_specs(cfg.prompts, cfg.seed) * cfg.draws


def real_specs(cfg: EvalConfig, other: bool = False) -> list[ShapeSpec]:
    """The real clips paired with the generated ones, draw after draw: draw d is redraw d (redraw draws + d for the
    other real set, the floor's), so one draw gives the real sets every table before draws had."""
    first = cfg.draws if other else 0
    return [
        spec
        for d in range(cfg.draws)
        for spec in eval_specs(cfg.prompts, cfg.seed, first + d, open_attributes=cfg.real_open)
    ]


def generation_seeds(count: int, seed: int) -> list[int]:
    """One noise seed per generated clip (prompts x draws of them), distinct for every clip."""
    return [seed * 1_000_003 + i for i in range(count)]


def rendered_batches(
    specs: list[ShapeSpec], frames: int, height: int, width: int, batch_size: int
) -> Iterator[tuple[list[ShapeSpec], np.ndarray]]:
    for start in range(0, len(specs), batch_size):
        batch = specs[start : start + batch_size]
        yield batch, np.stack([render(spec, frames, height, width) for spec in batch])


class PipelineCache:
    """The last system's pipeline (systems that share a model and run options run back to back) and one text encoder
    per config; a model that cannot be loaded or run so gives the reason as a string instead."""

    def __init__(self, device: str):
        self.device = device
        self.encoders: dict = {}
        self.key: tuple | None = None
        self.pipeline: Pipeline | str | None = None

    def get(self, system: SystemSpec | str) -> Pipeline | str:
        """The pipeline of a system, or of a model name run as built (float32, default options)."""
        if isinstance(system, str):
            system = SystemSpec(system, system)
        key = (system.model, system.dtype, system.run_options())
        if key != self.key:
            self.key, self.pipeline = key, None  # drop the previous model before loading the next
            try:
                self.pipeline = self._load(system)
            except ValueError as exc:  # a checkpoint that does not exist (yet), or options it cannot run with
                self.pipeline = str(exc)
        return self.pipeline

    def _load(self, system: SystemSpec) -> Pipeline:
        """As the server loads: the pipeline built in the system's dtype, then its run options applied."""
        dtype = getattr(torch, system.dtype)
        loaded = load_model(system.model, self.device, dtype)
        options = system.run_options()
        options.check(self.device, loaded.config.dit.depth)
        text = loaded.config.text
        if text not in self.encoders:
            self.encoders[text] = CachedTextEncoder(load_text_encoder(text, self.device))
        return options.apply(Pipeline(loaded, self.encoders[text], self.device, dtype))


def generate_set(
    pipeline: Pipeline,
    system: SystemSpec,
    specs: list[ShapeSpec],
    seeds: list[int],
    model: ClipClassifier,
    cfg: EvalConfig,
    bar,
) -> ClipSet:
    """Generate every prompt with one system, in batches, and keep what the metrics need."""
    clips_set = ClipSet()
    for start in range(0, len(specs), cfg.batch_size):
        batch = specs[start : start + cfg.batch_size]
        request = pipeline.request(
            [system.caption(s) for s in batch],
            seeds[start : start + len(batch)],
            size=cfg.size,
            seconds=cfg.seconds,
            steps=system.steps,
            guidance_scale=system.guidance,
            complete_prompts=system.complete_prompts,
        )
        began = time.perf_counter()
        clips, _ = pipeline.generate_video(request)
        clips_set.seconds += time.perf_counter() - began
        clips_set.add(clips, batch, model, cfg)
        bar.update(len(batch))
    return clips_set


def real_set(specs: list[ShapeSpec], model: ClipClassifier, cfg: EvalConfig, degraded: bool, bar) -> ClipSet:
    width, height = parse_size(cfg.size)
    clips_set = ClipSet()
    for batch, clips in rendered_batches(specs, frames_for_seconds(cfg.seconds, FPS), height, width, cfg.batch_size):
        clips_set.add(clips, batch, model, cfg)
        if degraded:
            clips_set.add_degraded(clips, batch, cfg.seed)
        bar.update(len(batch))
    return clips_set


def load_vae(model: str, device: str = "cpu") -> torch.nn.Module:
    """The VAE of a checkpoint folder (a VAE-only one too) or of a preset, in eval mode."""
    if Path(model).is_dir():
        return load_components(model, ("vae",), device)[1]["vae"].eval()
    return load_model(model, device).vae.eval()


def round_trip_set(
    system: SystemSpec, specs: list[ShapeSpec], model: ClipClassifier, cfg: EvalConfig, bar
) -> ClipSet | str:
    """The real clips of `specs` encoded and decoded by the system's VAE (posterior mean, whole clip), scored
    against the same specs; the reason as a string when the checkpoint cannot be loaded."""
    try:
        vae = load_vae(system.model, cfg.device)
    except ValueError as exc:  # a checkpoint that does not exist (yet)
        return str(exc)
    width, height = parse_size(cfg.size)
    clips_set = ClipSet()
    for batch, clips in rendered_batches(specs, frames_for_seconds(cfg.seconds, FPS), height, width, cfg.batch_size):
        began = time.perf_counter()
        with torch.inference_mode():
            video = torch.stack([to_tensor(clip) for clip in clips]).to(cfg.device)
            decoded = to_uint8(vae.decode(vae.encode(video)))
        clips_set.seconds += time.perf_counter() - began
        clips_set.add(decoded, batch, model, cfg)
        bar.update(len(batch))
    return clips_set
