"""Evaluation of text-to-video systems on held-out shapes prompts: prompt adherence read back by the analyzer, a
Frechet distance on the features of a small video classifier trained on real clips, and sharpness relative to
real clips; writes a markdown table and contact-sheet PNGs.

Every system sees the same prompts and seeds. The prompts are the held-out attribute combinations of
`training.data`, which no generator was trained on; the real clips are those prompts' specs rendered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from aptserve.engines.config import frames_for_seconds, parse_size
from aptserve.engines.loading import CONFIG_NAME, load_model, load_text_encoder
from aptserve.engines.pipeline import Pipeline
from aptserve.engines.text import CachedTextEncoder
from aptserve.training.analyzer import ATTRIBUTES, adherence, analyze, degrade
from aptserve.training.data import (
    COLOURS,
    MOTIONS,
    SHAPES,
    ShapeSpec,
    caption_of,
    held_out_combinations,
    render,
    shapes_sample,
    spec_for,
)

log = logging.getLogger("aptserve.training.eval")
FPS = 24  # the shapes dataset's frame rate
LABELS = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS}  # the classifier's three heads
CLASSIFIER_FRAMES = 7  # every 8th frame of 49: what the classifier sees (also what its training clips render)
CLASSIFIER_SIZE = 64
CLASSIFIER_DATA_SEED = 12345  # its training clips: training-split samples of this seed
SHEET_FRAMES = 5  # frames 0, 12, 24, 36, 48 of a 49-frame clip
DEGRADE = {"blur": 1.0, "noise": 6.0, "soften": 2}  # the degradation the analyzer's robustness is reported on


# ----------------------------------------------------------------------------------------------------------------------
# Config


PROMPT_FORMS = ("full", "short")


@dataclass(frozen=True)
class SystemSpec:
    name: str
    model: str  # checkpoint folder or preset; a missing folder skips the system with a note
    steps: int = 1
    guidance: float | None = None  # CFG scale for many-step sampling; None = the checkpoint's own default
    # "full": each held-out spec's caption; "short": only its colour, shape and motion ("a red circle moving
    # left"), the form users type. Adherence reads the same three attributes either way.
    prompt: str = "full"
    # complete each prompt by the checkpoint's caption grammar, as serving does (engines.prompts); off by default,
    # so a system is measured on the prompts as written
    complete_prompts: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"system {self.name!r}: steps must be >= 1; got {self.steps}")
        if self.prompt not in PROMPT_FORMS:
            raise ValueError(f"system {self.name!r}: prompt must be one of {PROMPT_FORMS}; got {self.prompt!r}")

    def caption(self, spec: ShapeSpec) -> str:
        return spec.caption if self.prompt == "full" else caption_of(spec.colour, spec.shape, spec.motion)

    @property
    def cfg_label(self) -> str:
        """Guidance only applies to many-step sampling (1 and 2 steps run the generator as is)."""
        if self.steps <= 2:
            return "—"
        return "model default" if self.guidance is None else f"{self.guidance:g}"


DEFAULT_SYSTEMS = (
    SystemSpec("teacher 25 steps + CFG", "models/shapes-teacher-tiny", 25),  # the CFG scale distillation bakes in
    SystemSpec("teacher 1 step", "models/shapes-teacher-tiny", 1),
    SystemSpec("consistency 1 step", "models/shapes-cd-tiny", 1),
    SystemSpec("APT 1 step", "models/shapes-apt-tiny", 1),
    SystemSpec("APT 2 steps", "models/shapes-apt-tiny", 2),
    SystemSpec("APT without aR1, 1 step", "models/shapes-apt-nor1-tiny", 1),
)


@dataclass(frozen=True)
class EvalConfig:
    systems: tuple[SystemSpec, ...] = DEFAULT_SYSTEMS  # JSON: a list of {name, model, steps, guidance}
    prompts: int = 256  # held-out prompts (287 held-out combinations; more prompts reuse them at new positions)
    seed: int = 0  # picks the prompts, their positions and the generation seeds
    size: str = "64x64"
    seconds: float = 2.0
    batch_size: int = 8
    classifier: str = "runs/eval-classifier.pt"  # cached; retrained when the fields below change
    real_clips: int = 2048  # rendered training-split clips the classifier learns from
    classifier_epochs: int = 8
    classifier_batch: int = 64
    out: str = "runs/eval/table.md"  # markdown fragment for docs/QUALITY.md; results JSON beside it
    sheets: str = "docs/quality"  # contact-sheet PNGs, one per system plus real.png
    sheet_prompts: int = 4
    links_relative_to: str = "docs"  # image links in the markdown are relative to where it will be merged
    device: str = "cpu"
    cache: str = "runs/eval/systems"  # per-system results, keyed by everything they depend on; "" disables

    def __post_init__(self) -> None:
        systems = tuple(s if isinstance(s, SystemSpec) else _system_from_dict(s) for s in self.systems)
        object.__setattr__(self, "systems", systems)
        parse_size(self.size)
        numbers = {
            "prompts": self.prompts,
            "batch_size": self.batch_size,
            "real_clips": self.real_clips,
            "classifier_epochs": self.classifier_epochs,
            "classifier_batch": self.classifier_batch,
        }
        bad = {k: v for k, v in numbers.items() if v < (2 if k == "prompts" else 1)}  # a covariance needs 2
        if bad or self.sheet_prompts < 0 or self.seconds <= 0:
            raise ValueError(f"eval config: need positive counts (prompts >= 2) and seconds; got {bad}, {self.seconds}")
        if len({s.name for s in systems}) != len(systems):
            raise ValueError(f"eval config: system names must be unique; got {[s.name for s in systems]}")


def _system_from_dict(data: dict) -> SystemSpec:
    try:
        return SystemSpec(**data)
    except TypeError as exc:
        raise ValueError(
            f"eval config: bad system {data}: {exc}; keys are name, model, steps, guidance, prompt"
        ) from exc


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and real clips


def eval_specs(count: int, seed: int, redraw: int = 0) -> list[ShapeSpec]:
    """`count` held-out specs, one combination each (cycling once all are used), at seeded start positions;
    `redraw` > 0 keeps the combinations but draws new positions (a second real set)."""
    combinations = held_out_combinations()
    order = np.random.default_rng(seed).permutation(len(combinations))
    return [
        spec_for(combinations[order[i % len(order)]], np.random.default_rng([seed, i, redraw])) for i in range(count)
    ]


def generation_seeds(count: int, seed: int) -> list[int]:
    return [seed * 1_000_003 + i for i in range(count)]


def rendered_batches(
    specs: list[ShapeSpec], frames: int, height: int, width: int, batch_size: int
) -> Iterator[tuple[list[ShapeSpec], np.ndarray]]:
    for start in range(0, len(specs), batch_size):
        batch = specs[start : start + batch_size]
        yield batch, np.stack([render(spec, frames, height, width) for spec in batch])


# ----------------------------------------------------------------------------------------------------------------------
# Metrics: Frechet distance, sharpness


def frechet_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)), the Frechet distance of two Gaussians."""
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    with warnings.catch_warnings():  # "matrix is singular" when there are fewer samples than features
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # nudge both covariances off singular, as pytorch-fid does
            offset = np.eye(len(cov_a)) * 1e-6
            covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # The product of two PSD matrices has real non-negative eigenvalues; imaginary parts are round-off from a
    # nearly singular product (fewer samples than features), so they are dropped.
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean), 0.0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (the FID/FVD formula)."""
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with the same D; got {feats_a.shape} and {feats_b.shape}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError(f"need at least 2 samples per set; got {len(feats_a)} and {len(feats_b)}")
    moments = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (feats_a, feats_b)]
    return frechet_from_moments(*moments[0], *moments[1])


def laplacian_energy(clips: np.ndarray) -> np.ndarray:
    """Per clip (B, F, H, W, 3) uint8: mean squared 4-neighbour Laplacian of the luma (0-255), interior pixels."""
    luma = clips.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (B, F, H, W)
    lap = (
        4 * luma[..., 1:-1, 1:-1]
        - luma[..., :-2, 1:-1]
        - luma[..., 2:, 1:-1]
        - luma[..., 1:-1, :-2]
        - luma[..., 1:-1, 2:]
    )
    return np.mean(lap**2, axis=(1, 2, 3))


def sharpness_ratio(clips: np.ndarray, real: np.ndarray) -> float:
    """Laplacian energy of `clips` over that of `real` clips (of the same prompts): 1.0 = as sharp as real."""
    return float(laplacian_energy(clips).mean() / max(laplacian_energy(real).mean(), 1e-12))


# ----------------------------------------------------------------------------------------------------------------------
# The feature classifier: a per-frame 2D CNN with temporal convolutions over 7 frames at 64x64, three heads


def _block(c_in: int, c_out: int, stride: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.SiLU())


class ClipClassifier(nn.Module):
    """(B, T, 3, 64, 64) -> 96-d features (the Frechet space) and colour / shape / motion logits.

    The features are what the clip shows (64-d: each channel's spatial max, averaged over frames; max pooling is
    what lets a small CNN learn shape quickly) and how it moves (32-d: a per-frame position code, convolved over
    time); the heads are linear on them."""

    def __init__(self, width: int = 16, position: int = 64, motion: int = 32, frames: int = CLASSIFIER_FRAMES):
        super().__init__()
        channels = 4 * width
        self.frame = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, channels), _block(channels, channels, 1)
        )  # (BT, C, 8, 8)
        self.where = nn.Sequential(nn.Conv2d(channels, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, position), nn.SiLU())
        self.time = nn.Sequential(
            nn.Conv1d(position, position, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv1d(position, position, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        steps = ((frames - 1) // 2) // 2 + 1  # length after the two stride-2 convolutions
        self.motion = nn.Sequential(nn.Flatten(), nn.Linear(position * steps, motion), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(channels + motion, len(labels)) for name, labels in LABELS.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, t = x.shape[:2]
        h = self.frame(x.flatten(0, 1))  # (BT, C, 8, 8)
        appearance = h.amax(dim=(2, 3)).reshape(b, t, -1).mean(dim=1)  # (B, C)
        where = self.where(h).reshape(b, t, -1).transpose(1, 2)  # (B, P, T)
        feats = torch.cat([appearance, self.motion(self.time(where))], dim=1)  # (B, C + M)
        return feats, {name: head(feats) for name, head in self.heads.items()}


def classifier_input(clips: np.ndarray) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 7, 3, 64, 64) in [-1, 1]: 7 evenly spaced frames, area-resized."""
    index = np.round(np.linspace(0, clips.shape[1] - 1, CLASSIFIER_FRAMES)).astype(int)
    x = torch.from_numpy(np.ascontiguousarray(clips[:, index])).float()  # (B, T, H, W, 3)
    b, t, h, w, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w)
    if (h, w) != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="area")
    return x.reshape(b, t, 3, CLASSIFIER_SIZE, CLASSIFIER_SIZE).div(127.5).sub(1.0)


def label_tensor(specs: list[ShapeSpec]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([labels.index(getattr(s, name)) for s in specs]) for name, labels in LABELS.items()}


def classifier_key(cfg: EvalConfig) -> dict:
    """What the cached classifier depends on; a mismatch retrains it."""
    width, height = parse_size(cfg.size)
    return {
        "version": 2,
        "clips": cfg.real_clips,
        "epochs": cfg.classifier_epochs,
        "batch": cfg.classifier_batch,
        "height": height,
        "width": width,
    }


def train_classifier(cfg: EvalConfig, progress: bool = True) -> tuple[ClipClassifier, dict]:
    """Deterministic: fixed seeds for the data, the init and the shuffles. Clips are rendered at 7 frames, the
    times the classifier samples from a 49-frame clip; returns the model and training stats."""
    from tqdm import tqdm

    key = classifier_key(cfg)
    start = time.perf_counter()
    samples = [
        shapes_sample(CLASSIFIER_DATA_SEED, i, CLASSIFIER_FRAMES, key["height"], key["width"])
        for i in tqdm(range(cfg.real_clips), desc="render classifier clips", disable=not progress)
    ]
    clips = np.stack([clip for clip, _ in samples])  # (N, 7, H, W, 3) uint8; floats would be 4x the memory
    labels = label_tensor([spec for _, spec in samples])
    torch.manual_seed(0)
    model = ClipClassifier()
    steps = cfg.classifier_epochs * math.ceil(cfg.real_clips / cfg.classifier_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    shuffle = torch.Generator().manual_seed(0)
    bar = tqdm(total=steps, desc="train eval classifier", disable=not progress)
    model.train()
    for _ in range(cfg.classifier_epochs):
        for batch in torch.randperm(cfg.real_clips, generator=shuffle).split(cfg.classifier_batch):
            _, logits = model(classifier_input(clips[batch.numpy()]))
            loss = sum(F.cross_entropy(logits[name], labels[name][batch]) for name in LABELS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, {"seconds": time.perf_counter() - start, "steps": steps, "final_loss": loss.item()}


def load_or_train_classifier(cfg: EvalConfig, progress: bool = True) -> tuple[ClipClassifier, dict]:
    """The cached classifier at `cfg.classifier` if it was trained with this config's settings, else train it."""
    path, key = Path(cfg.classifier), classifier_key(cfg)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            model = ClipClassifier()
            model.load_state_dict(saved["state"])
            return model.eval(), saved["stats"]
        log.info("eval classifier at %s was trained with %s; retraining for %s", path, saved.get("key"), key)
    model, stats = train_classifier(cfg, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "state": model.state_dict(), "stats": stats}, tmp)
    os.replace(tmp, path)
    return model, stats


@torch.no_grad()
def classify(model: ClipClassifier, clips: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (B, D) and predicted label indices per head."""
    feats, logits = model(classifier_input(clips))
    return feats.numpy(), {name: value.argmax(dim=1).numpy() for name, value in logits.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Scoring a set of clips


@dataclass
class ClipSet:
    """What is kept of a system's clips: analyzer hits, classifier features and hits, sharpness, sheet frames."""

    hits: list[dict[str, bool]] = field(default_factory=list)
    degraded_hits: list[dict[str, bool]] = field(default_factory=list)
    classifier_hits: list[dict[str, bool]] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    energy: list[np.ndarray] = field(default_factory=list)
    sheet: list[np.ndarray] = field(default_factory=list)  # (SHEET_FRAMES, H, W, 3) per sheet prompt
    seconds: float = 0.0

    def add(self, clips: np.ndarray, specs: list[ShapeSpec], model: ClipClassifier, cfg: EvalConfig) -> None:
        self.hits += [adherence(analyze(clip), spec) for clip, spec in zip(clips, specs)]
        feats, predicted = classify(model, clips)
        self.features.append(feats)
        truth = {name: value.numpy() for name, value in label_tensor(specs).items()}
        self.classifier_hits += [
            {name: bool(predicted[name][i] == truth[name][i]) for name in LABELS} for i in range(len(specs))
        ]
        self.energy.append(laplacian_energy(clips))
        index = np.round(np.linspace(0, clips.shape[1] - 1, SHEET_FRAMES)).astype(int)
        self.sheet += [clip[index] for clip in clips[: max(0, cfg.sheet_prompts - len(self.sheet))]]

    def add_degraded(self, clips: np.ndarray, specs: list[ShapeSpec], seed: int) -> None:
        first = len(self.degraded_hits)
        for i, (clip, spec) in enumerate(zip(clips, specs)):
            noisy = degrade(clip, np.random.default_rng([seed, first + i]), **DEGRADE)
            self.degraded_hits.append(adherence(analyze(noisy), spec))


def accuracy(hits: list[dict[str, bool]], names: tuple[str, ...] = (*ATTRIBUTES, "all")) -> dict[str, float]:
    return {name: float(np.mean([h[name] for h in hits])) for name in names} if hits else {}


def summarise(system: ClipSet, real: ClipSet) -> dict:
    feats, real_feats = np.concatenate(system.features), np.concatenate(real.features)
    return {
        "adherence": accuracy(system.hits),
        "adherence_extra": accuracy(system.hits, ("background", "size", "speed")),
        "classifier_adherence": accuracy(system.classifier_hits, tuple(LABELS)),
        "frechet": frechet_distance(feats, real_feats),
        "sharpness": float(np.concatenate(system.energy).mean() / np.concatenate(real.energy).mean()),
        "seconds_per_clip": system.seconds / max(len(system.hits), 1),
    }


class PipelineCache:
    """The last model's pipeline (systems that share a model run back to back) and one text encoder per config;
    a model that cannot be loaded gives the reason as a string instead."""

    def __init__(self, device: str):
        self.device = device
        self.encoders: dict = {}
        self.name: str | None = None
        self.pipeline: Pipeline | str | None = None

    def get(self, model: str) -> Pipeline | str:
        if model != self.name:
            self.name, self.pipeline = model, None  # drop the previous model before loading the next
            try:
                loaded = load_model(model, self.device)
            except ValueError as exc:  # a checkpoint that does not exist (yet) or cannot be loaded
                self.pipeline = str(exc)
            else:
                text = loaded.config.text
                if text not in self.encoders:
                    self.encoders[text] = CachedTextEncoder(load_text_encoder(text, self.device))
                self.pipeline = Pipeline(loaded, self.encoders[text], self.device)
        return self.pipeline


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


# ----------------------------------------------------------------------------------------------------------------------
# Output: PNG contact sheets, the markdown table


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """uint8 (H, W, 3) -> an 8-bit RGB PNG, written with zlib and struct only."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"need a uint8 (H, W, 3) image; got {image.dtype} {image.shape}")
    height, width, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)  # filter 0
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def contact_sheet(rows: list[np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Rows of frames (T, H, W, 3) -> one image: a row per prompt, a column per frame, mid-gray gaps."""
    t, h, w, _ = rows[0].shape
    sheet = np.full((len(rows) * (h + gap) + gap, t * (w + gap) + gap, 3), 128, np.uint8)
    for r, frames in enumerate(rows):
        for c, frame in enumerate(frames):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            sheet[y : y + h, x : x + w] = frame
    return sheet.repeat(scale, axis=0).repeat(scale, axis=1)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def table_row(name: str, steps: str, cfg_label: str, result: dict | None) -> str:
    if result is None:
        return f"| {name} | {steps} | {cfg_label} | — | — | — | — | — | — | — |"
    adh = result["adherence"]
    seconds = result.get("seconds_per_clip")
    return (
        f"| {name} | {steps} | {cfg_label} | {_pct(adh['colour'])} | {_pct(adh['shape'])} | {_pct(adh['motion'])} "
        f"| {_pct(adh['all'])} | {result['frechet']:.2f} | {result['sharpness']:.2f} "
        f"| {'—' if seconds is None else f'{seconds:.3f}'} |"
    )


def markdown(cfg: EvalConfig, report: dict) -> str:
    width, height = parse_size(cfg.size)
    frames = frames_for_seconds(cfg.seconds, FPS)
    real, analyzer, clf = report["real"], report["analyzer"], report["classifier"]
    lines = [
        f"Held-out prompts: {cfg.prompts} (seed {cfg.seed}), {width}x{height}, {frames} frames, the same prompts and "
        "seeds for every system.",
        "",
        "| system | steps | CFG | colour | shape | motion | all | Frechet | sharpness | seconds/clip |",
        "|---|---|---|---|---|---|---|---|---|---|",
        table_row("real clips, other start positions (reference)", "—", "—", real),
    ]
    lines += [table_row(s.name, str(s.steps), s.cfg_label, report["systems"].get(s.name)) for s in cfg.systems]
    lines += [""] + [f"- skipped **{name}**: {why}" for name, why in report["skipped"].items()]
    a, d = analyzer["real"], analyzer["degraded"]
    lines += [
        "",
        f"- Adherence is read back by `training/analyzer.py` (no learned parts). On the {cfg.prompts} real clips of "
        f"these prompts it reads colour {_pct(a['colour'])}, shape {_pct(a['shape'])}, motion {_pct(a['motion'])}, "
        f"all three {_pct(a['all'])}; on copies degraded by a VAE-like softening (pool {DEGRADE['soften']}x), blur "
        f"{DEGRADE['blur']} px and noise {DEGRADE['noise']}/255: all three {_pct(d['all'])}.",
        f"- Frechet distance: between Gaussians fitted to the 96-d penultimate features of a small video classifier "
        f"(per-frame CNN + temporal convolutions, {CLASSIFIER_FRAMES} frames at {CLASSIFIER_SIZE}x{CLASSIFIER_SIZE}, "
        f"trained on {cfg.real_clips} rendered training-split clips in {clf['seconds']:.0f} s) of generated clips "
        "and of the real clips of the same "
        f"prompts. The classifier reads those real clips as colour {_pct(clf['accuracy']['colour'])}, shape "
        f"{_pct(clf['accuracy']['shape'])}, motion {_pct(clf['accuracy']['motion'])}. The reference row is the "
        "floor: real clips of the same prompts at other start positions.",
        "- Sharpness: mean squared Laplacian of the luma, generated over real clips of the same prompts (1.0 = as "
        "sharp as real). seconds/clip: wall time of the whole pipeline (text, generator, VAE decode) over clips, "
        f"batch {cfg.batch_size}, on {cfg.device}.",
        f"- Contact sheets: rows are the first {cfg.sheet_prompts} prompts, columns frames "
        f"{', '.join(str(i) for i in np.round(np.linspace(0, frames - 1, SHEET_FRAMES)).astype(int))}.",
    ]
    lines += [f"  {i + 1}. {caption}" for i, caption in enumerate(report["sheet_captions"])]
    lines += [f"  - {name}: ![{name}]({link})" for name, link in report["sheets"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Entry point


def write_sheet(cfg: EvalConfig, name: str, rows: list[np.ndarray]) -> str:
    path = write_png(Path(cfg.sheets) / f"{slug(name)}.png", contact_sheet(rows))
    return os.path.relpath(path, cfg.links_relative_to)


def model_fingerprint(model: str, prompt_grammar: bool = True) -> str:
    """sha256 over a checkpoint folder's files (names and bytes); a preset name stands for itself. Without
    `prompt_grammar` the config's caption grammar is left out (hashed as the config written without it): a system
    that prompts as written does not read it."""
    path = Path(model)
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        if file.name == CONFIG_NAME and not prompt_grammar:
            config = json.loads(file.read_text())
            if "prompt_grammar" in config:
                del config["prompt_grammar"]
                digest.update((json.dumps(config, indent=2) + "\n").encode())
                continue
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class SystemCache:
    """A system's summary and contact-sheet frames, stored under a key of everything they depend on: the system,
    the checkpoint's bytes, the prompts, sizes and batch, the classifier. Re-running an evaluation after one
    model changed regenerates only the systems of that model."""

    def __init__(self, cfg: EvalConfig):
        self.root = Path(cfg.cache) if cfg.cache else None
        self.common = {
            "version": 1,
            "prompts": cfg.prompts,
            "seed": cfg.seed,
            "size": cfg.size,
            "seconds": cfg.seconds,
            "batch_size": cfg.batch_size,
            "sheet_prompts": cfg.sheet_prompts,
            "classifier": classifier_key(cfg),
            "device": cfg.device,
        }
        self.fingerprints: dict[tuple[str, bool], str] = {}

    def _path(self, system: SystemSpec) -> Path | None:
        if self.root is None:
            return None
        which = (system.model, system.complete_prompts)
        if which not in self.fingerprints:
            self.fingerprints[which] = model_fingerprint(*which)
        described = asdict(system)
        # defaults since before these fields existed: earlier results stay valid
        if described["prompt"] == "full":
            del described["prompt"]
        if not described["complete_prompts"]:
            del described["complete_prompts"]
        key = {**self.common, "system": described, "model": self.fingerprints[which]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"{slug(system.name)}-{digest}"

    def load(self, system: SystemSpec) -> tuple[dict, np.ndarray] | None:
        path = self._path(system)
        if path is None or not path.with_suffix(".json").is_file() or not path.with_suffix(".npy").is_file():
            return None
        return json.loads(path.with_suffix(".json").read_text()), np.load(path.with_suffix(".npy"))

    def store(self, system: SystemSpec, summary: dict, sheet: np.ndarray) -> None:
        path = self._path(system)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".npy"), sheet)
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")


def run_eval(cfg: EvalConfig, progress: bool = True, only: tuple[str, ...] = ()) -> Path:
    """Generate the held-out prompts with every system, score them, write the table; returns the table's path.
    `only` names the systems to (re)generate when their cached results are stale; the others are reported from
    the cache when it holds them and skipped otherwise."""
    from tqdm import tqdm

    unknown = set(only) - {s.name for s in cfg.systems}
    if unknown:
        raise ValueError(f"eval: no such systems {sorted(unknown)}; the config has {[s.name for s in cfg.systems]}")
    specs = eval_specs(cfg.prompts, cfg.seed)
    seeds = generation_seeds(cfg.prompts, cfg.seed)
    model, stats = load_or_train_classifier(cfg, progress)
    bar = tqdm(total=cfg.prompts * (2 + len(cfg.systems)), desc="eval clips", disable=not progress)
    real = real_set(specs, model, cfg, degraded=True, bar=bar)
    other = real_set(eval_specs(cfg.prompts, cfg.seed, redraw=1), model, cfg, degraded=False, bar=bar)
    report = {
        "config": asdict(cfg),
        "analyzer": {"real": accuracy(real.hits), "degraded": accuracy(real.degraded_hits)},
        "classifier": {**stats, "accuracy": accuracy(real.classifier_hits, tuple(LABELS))},
        "real": {**summarise(other, real), "seconds_per_clip": None},
        "systems": {},
        "skipped": {},
        "sheet_captions": [s.caption for s in specs[: cfg.sheet_prompts]],
        "sheets": {},
    }
    if cfg.sheet_prompts:
        report["sheets"]["real"] = write_sheet(cfg, "real", real.sheet)
    pipelines, cache = PipelineCache(cfg.device), SystemCache(cfg)
    for system in cfg.systems:
        cached = cache.load(system)
        if cached is None and only and system.name not in only:
            report["skipped"][system.name] = "not selected, and no cached result for its current checkpoint"
            bar.update(cfg.prompts)
            continue
        if cached is not None:
            log.info("%s: cached result for this checkpoint", system.name)
            summary, sheet = cached
            bar.update(cfg.prompts)
        else:
            pipeline = pipelines.get(system.model)
            if isinstance(pipeline, str):
                log.warning("skipping %s: %s", system.name, pipeline)
                report["skipped"][system.name] = pipeline
                bar.update(cfg.prompts)
                continue
            clips_set = generate_set(pipeline, system, specs, seeds, model, cfg, bar)
            summary = summarise(clips_set, real)
            sheet = np.stack(clips_set.sheet) if clips_set.sheet else np.zeros((0,), np.uint8)
            cache.store(system, summary, sheet)
        report["systems"][system.name] = summary
        if cfg.sheet_prompts and len(sheet):
            report["sheets"][system.name] = write_sheet(cfg, system.name, list(sheet))
    bar.close()
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(cfg, report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out
