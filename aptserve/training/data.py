"""Training data: the procedural "shapes" text-to-video dataset, and a loader for a folder of real clips.

A shapes sample is one coloured shape on a plain background, moving or changing size, with a caption from a small
grammar. Sample `i` of seed `s` is a pure function of (s, i), so runs and evaluations are reproducible.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from aptserve.engines.prompts import CaptionGrammar, Slot

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
MOTIONS = ("left", "right", "up", "down", "growing", "shrinking")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
}
SIZES = {"small": 0.13, "large": 0.21}  # radius as a fraction of the shorter side
SPEEDS = {"slowly": 0.35, "quickly": 0.7}  # distance over the clip as a fraction of the side; or size change
HELD_OUT_EVERY = 6  # one attribute combination in six is never trained on


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    motion: str
    background: str
    size: str
    speed: str
    x0: float = 0.5  # start centre, as fractions of width and height
    y0: float = 0.5

    @property
    def caption(self) -> str:
        return caption_of(self.colour, self.shape, self.motion, self.size, self.speed, self.background)

    @property
    def combination(self) -> tuple[str, ...]:
        return self.colour, self.shape, self.motion, self.background, self.size, self.speed


OPTIONAL_ATTRIBUTES = ("size", "speed", "background")  # a caption may leave any of these out


def caption_grammar() -> CaptionGrammar:
    """The grammar: "a [size] colour shape verb [speed] [on a background background]". Checkpoints trained on
    these captions carry it, so serving completes a short prompt into this form (engines.prompts)."""
    return CaptionGrammar(
        (
            Slot("size", {s: s for s in SIZES}),
            Slot("colour", {c: c for c in COLOURS}, required=True),
            Slot("shape", {s: s for s in SHAPES}, required=True),
            Slot("motion", {m: m if m in ("growing", "shrinking") else f"moving {m}" for m in MOTIONS}, required=True),
            Slot("speed", {s: s for s in SPEEDS}),
            Slot("background", {b: f"on a {b} background" for b in BACKGROUNDS}),
        )
    )


def caption_of(
    colour: str,
    shape: str,
    motion: str,
    size: str | None = None,
    speed: str | None = None,
    background: str | None = None,
) -> str:
    """The caption of these attributes by `caption_grammar`; the optional ones may be left out."""
    named = {"colour": colour, "shape": shape, "motion": motion, "size": size, "speed": speed, "background": background}
    return _GRAMMAR.render({k: v for k, v in named.items() if v})


_GRAMMAR = caption_grammar()


def named_attributes(prompt: str) -> dict[str, str]:
    """The attributes a free-form prompt names, by the shapes vocabulary: "a red circle moving left" ->
    {colour: red, shape: circle, motion: left}. Attributes the prompt does not name are left out."""
    words = re.findall(r"[a-z]+", prompt.lower())
    vocab = {
        "colour": tuple(COLOURS),
        "shape": SHAPES,
        "motion": MOTIONS,
        "background": tuple(BACKGROUNDS),
        "size": tuple(SIZES),
        "speed": tuple(SPEEDS),
    }
    found = {}
    for name, values in vocab.items():
        hits = [w for w in words if w in values]  # background names are no colour names, so no clash
        if hits:
            found[name] = hits[0]
    return found


def shorter_captions(caption: str) -> list[str]:
    """The captions of the same clip that leave out one or more of the optional attributes it names: 7 for a full
    caption, from "a large red circle moving left slowly on a black background" down to "a red circle moving
    left". Users write short prompts; a model trained only on full captions meets them out of distribution."""
    named = named_attributes(caption)
    if not {"colour", "shape", "motion"} <= named.keys() or caption_of(**named) != caption:
        raise ValueError(f"not a shapes caption: {caption!r}")
    present = [name for name in OPTIONAL_ATTRIBUTES if name in named]
    shorter = []
    for keep in itertools.product((True, False), repeat=len(present)):
        if all(keep):
            continue
        dropped = {name for name, k in zip(present, keep) if not k}
        shorter.append(caption_of(**{k: v for k, v in named.items() if k not in dropped}))
    return shorter


def is_held_out(combination: tuple[str, ...]) -> bool:
    digest = hashlib.sha256("|".join(combination).encode()).digest()
    return digest[0] % HELD_OUT_EVERY == 0


def all_combinations() -> list[tuple[str, ...]]:
    return list(itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS, SIZES, SPEEDS))


def held_out_combinations() -> list[tuple[str, ...]]:
    return [c for c in all_combinations() if is_held_out(c)]


def start_position(motion: str, distance: float, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A start centre from which the whole motion stays inside the frame."""
    lo, hi = margin, 1 - margin
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if motion == "left":
        x = rng.uniform(lo + distance, hi)
    elif motion == "right":
        x = rng.uniform(lo, hi - distance)
    elif motion == "up":
        y = rng.uniform(lo + distance, hi)
    elif motion == "down":
        y = rng.uniform(lo, hi - distance)
    return x, y


def sample_spec(rng: np.random.Generator, held_out: bool = False) -> ShapeSpec:
    """A random spec from the training split (or the held-out split)."""
    while True:
        combination = tuple(
            rng.choice(list(options)) for options in (COLOURS, SHAPES, MOTIONS, BACKGROUNDS, SIZES, SPEEDS)
        )
        if is_held_out(combination) == held_out:
            break
    return spec_for(combination, rng)


def spec_for(combination: tuple[str, ...], rng: np.random.Generator) -> ShapeSpec:
    colour, shape, motion, background, size, speed = combination
    radius = SIZES[size]
    distance = SPEEDS[speed] * (1 - 2 * radius - 0.1)
    margin = radius * (1.45 if motion == "growing" else 1.0) + 0.03
    x0, y0 = start_position(motion, distance, rng, margin)
    return ShapeSpec(colour, shape, motion, background, size, speed, float(x0), float(y0))


def trajectory(spec: ShapeSpec, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre (x, y as fractions) and radius (fraction of the shorter side)."""
    t = np.linspace(0.0, 1.0, frames)
    radius = SIZES[spec.size]
    distance = SPEEDS[spec.speed] * (1 - 2 * radius - 0.1)
    dx = {"left": -distance, "right": distance}.get(spec.motion, 0.0)
    dy = {"up": -distance, "down": distance}.get(spec.motion, 0.0)
    growth = 0.45 * SPEEDS[spec.speed] / 0.7  # up to +-45% of the radius over the clip
    scale = {"growing": 1 - growth / 2 + growth * t, "shrinking": 1 + growth / 2 - growth * t}.get(
        spec.motion, 1 + 0 * t
    )
    return spec.x0 + dx * t, spec.y0 + dy * t, radius * scale


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test for a shape of radius r at offsets (dx, dy) from its centre (y grows downwards)."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        half = r * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # equilateral, pointing up, centred on its centroid
        top, bottom = -r, r / 2
        half_width = (dy - top) / (bottom - top) * r * math.sqrt(3)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width / 2 * 1.0)
    if shape == "star":  # five points; radius interpolated between outer and inner vertices by angle
        angle = np.arctan2(dx, -dy) % (2 * math.pi / 5)
        frac = np.abs(angle / (2 * math.pi / 5) - 0.5) * 2  # 1 at a point, 0 between points
        limit = r * (0.45 + 0.55 * frac)
        return dx**2 + dy**2 <= limit**2
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render(spec: ShapeSpec, frames: int = 49, height: int = 64, width: int = 64, supersample: int = 3) -> np.ndarray:
    """The clip as uint8 (F, H, W, 3), anti-aliased by supersampling."""
    side = min(height, width)
    ys = (np.arange(height * supersample) + 0.5) / supersample
    xs = (np.arange(width * supersample) + 0.5) / supersample
    cx, cy, radius = trajectory(spec, frames)
    colour = np.array(COLOURS[spec.colour], dtype=np.float32)
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        dx = xs[None, :] - cx[f] * width
        dy = ys[:, None] - cy[f] * height
        mask = shape_mask(spec.shape, dx, dy, radius[f] * side).astype(np.float32)
        cover = mask.reshape(height, supersample, width, supersample).mean(axis=(1, 3))[..., None]  # (H, W, 1)
        video[f] = np.round(background * (1 - cover) + colour * cover).astype(np.uint8)
    return video


def to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, H, W) in [-1, 1], the VAE's input convention."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def shapes_sample(
    seed: int, index: int, frames: int = 49, height: int = 64, width: int = 64, held_out: bool = False
) -> tuple[np.ndarray, ShapeSpec]:
    rng = np.random.default_rng([seed, index, int(held_out)])
    spec = sample_spec(rng, held_out)
    return render(spec, frames, height, width), spec


class ShapesDataset(IterableDataset):
    """Infinite stream of (video (3, F, H, W) in [-1, 1], caption); deterministic by seed, split across workers."""

    def __init__(
        self,
        seed: int = 0,
        frames: int = 49,
        height: int = 64,
        width: int = 64,
        held_out: bool = False,
        start: int = 0,
    ):
        super().__init__()
        if frames < 1 or (frames - 1) % 4:
            raise ValueError(f"frames must be 4*k + 1; got {frames}")
        self.seed, self.frames, self.height, self.width, self.held_out = seed, frames, height, width, held_out
        self.start = start  # first sample index: a resumed run continues the same stream

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        first, step = (self.start, 1) if info is None else (self.start + info.id, info.num_workers)
        for index in itertools.count(first, step):
            video, spec = shapes_sample(self.seed, index, self.frames, self.height, self.width, self.held_out)
            yield to_tensor(video), spec.caption


class VideoFolderDataset(torch.utils.data.Dataset):
    """Real clips: `name.mp4` with its caption in `name.txt`, resized to height x width, `frames` frames from the
    start at the clip's own rate (clips shorter than that are skipped with a clear error when listed)."""

    def __init__(self, folder: str | Path, frames: int = 49, height: int = 64, width: int = 64):
        self.folder = Path(folder)
        self.frames, self.height, self.width = frames, height, width
        self.clips = sorted(p for p in self.folder.glob("*.mp4") if p.with_suffix(".txt").is_file())
        if not self.clips:
            raise ValueError(f"no *.mp4 files with a same-name .txt caption in {self.folder}")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        import av

        path = self.clips[index]
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        frames = []
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                frames.append(frame.to_ndarray(format="rgb24", width=self.width, height=self.height))
                if len(frames) == self.frames:
                    break
        if len(frames) < self.frames:
            raise ValueError(f"{path} has {len(frames)} frames; need {self.frames}")
        return to_tensor(np.stack(frames)), caption
