"""Reads a shapes clip back into its caption's attributes (colour, shape, motion, background, size, speed), with no
learned parts, so generated clips can be scored for prompt adherence.

The recipe: the background is the median border colour; each pixel's coverage `alpha` is its projection onto the
line from the background to the foreground colour (linear in blending, so blur moves coverage but keeps its mass);
the shape comes from complex moments sum(alpha * (z - centroid)^k) for k = 3, 4, 5, which a rotationally symmetric
blur leaves unchanged (a triangle has 3-fold symmetry, a square 4-fold, a star 5-fold, a circle none); the motion
from the centroid trajectory and the coverage's area trend; the colour from the palette colour whose blend line
with the background best explains the most distinct pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from aptserve.training.data import BACKGROUNDS, COLOURS, SHAPES, SIZES, SPEEDS, ShapeSpec

ATTRIBUTES = ("colour", "shape", "motion")  # the three a caption must get right; "all" means these three
# |c_k| / area^(1 + k/2) of each shape's own symmetry order, measured on clean 64x64 renders (any size, any frame).
SHAPE_MOMENTS = {"triangle": (3, 0.0675), "square": (4, 0.0167), "star": (5, 0.0214)}
CIRCLE_BELOW = 0.25  # every symmetry moment under this fraction of its shape's value: a circle
AREA_PER_R2 = {"circle": math.pi, "square": 1.7**2, "triangle": 0.75 * math.sqrt(3) * 1.5, "star": 1.73}
OPPONENT = np.array([[0.5 / 3, 0.5 / 3, 0.5 / 3], [0.5, -0.5, 0.0], [0.25, 0.25, -0.5]], np.float32)  # L/2, R-G, Y-B
MIN_AREA = 3.0  # pixels of coverage below which a frame counts as empty
MIN_CONTRAST = 8.0  # RGB distance (0-255) of foreground from background below which nothing is in front
CORE_FRACTION = 0.003  # the most distinct pixels of the clip, whose mean is the foreground colour


@dataclass(frozen=True)
class Reading:
    colour: str
    shape: str
    motion: str
    background: str
    size: str
    speed: str
    visible_frames: int  # frames with a foreground at all; 0 means the rest is a guess
    # each shape's symmetry moment over that shape's own value (median over visible frames): the largest names the
    # shape when it reaches CIRCLE_BELOW, else the clip reads as a circle; how near a reading is to flipping
    shape_scores: dict[str, float] = field(default_factory=dict, compare=False)


def analyze(video: np.ndarray) -> Reading:
    """uint8 (F, H, W, 3) -> the attributes a shapes caption would name."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a clip of shape (F, H, W, 3); got {video.shape}")
    pixels = video.astype(np.float32)
    background = border_colour(pixels)
    foreground = core_colour(pixels, background)
    alpha = coverage(pixels, background, foreground)  # (F, H, W)
    area, cx, cy, moments = frame_moments(alpha)
    visible = area >= MIN_AREA
    side = min(video.shape[1:3])
    shape = classify_shape(moments[visible])
    motion, travel = classify_motion(area[visible], cx[visible], cy[visible], side)
    return Reading(
        colour=nearest_colour(foreground, background),
        shape=shape,
        motion=motion,
        background=min(BACKGROUNDS, key=lambda name: np.sum((np.array(BACKGROUNDS[name]) - background) ** 2)),
        size=classify_size(area[visible], shape, side),
        speed=classify_speed(motion, travel, area[visible], shape, side),
        visible_frames=int(visible.sum()),
        shape_scores={name: round(v, 3) for name, v in shape_scores(moments[visible]).items()},
    )


def adherence(reading: Reading, spec: ShapeSpec) -> dict[str, bool]:
    """Per attribute: did the clip show what the caption asked for; "all" = colour, shape and motion together."""
    hits = {
        name: getattr(reading, name) == getattr(spec, name) for name in (*ATTRIBUTES, "background", "size", "speed")
    }
    hits["all"] = all(hits[name] for name in ATTRIBUTES)
    return hits


# ----------------------------------------------------------------------------------------------------------------------
# Pixels -> background, foreground colour, coverage


def border_colour(pixels: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel frame border over all frames: shapes never touch it."""
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0)


def core_colour(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Mean of the pixels farthest from the background (in opponent space, so blur and noise matter less)."""
    offset = (pixels - background) @ OPPONENT.T
    distance = np.einsum("...c,...c->...", offset, offset).reshape(-1)
    count = max(1, int(CORE_FRACTION * distance.size))
    core = distance >= np.sort(distance)[-count]  # a sort, not argpartition: ties (flat colours) make that slow
    return pixels.reshape(-1, 3)[core].mean(axis=0)


def coverage(pixels: np.ndarray, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Per pixel, how far along the background -> foreground blend line it lies (0 background, 1 foreground)."""
    direction = foreground - background
    norm = float(direction @ direction)
    if norm < MIN_CONTRAST**2:  # a flat clip: nothing in front of the background
        return np.zeros(pixels.shape[:3], np.float32)
    return np.clip(((pixels - background) @ direction) / norm, -1.0, 2.0)  # bounded for garbage clips


def nearest_colour(foreground: np.ndarray, background: np.ndarray) -> str:
    """The palette colour whose blend with the background (50-105% of the way) best matches the foreground."""

    def residual(name: str) -> float:
        direction = (np.array(COLOURS[name], np.float32) - background) @ OPPONENT.T
        offset = (foreground - background) @ OPPONENT.T
        t = np.clip(offset @ direction / max(float(direction @ direction), 1e-6), 0.5, 1.05)
        return float(np.sum((offset - t * direction) ** 2))

    return min(COLOURS, key=residual)


# ----------------------------------------------------------------------------------------------------------------------
# Coverage -> per-frame area, centroid, symmetry moments


def frame_moments(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: coverage area, centroid x and y (pixels), and |c_k| / area^(1 + k/2) for k = 3, 4, 5 (F, 3).

    Coverage is summed only near the object (within 3 px of where it is over half), so background noise and
    stray blotches far away do not drag the centroid."""
    height, width = alpha.shape[1:]
    near = ndimage.maximum_filter(alpha > 0.5, size=(1, 7, 7))
    weight = np.where(near, alpha, 0.0)  # (F, H, W)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    area = weight.sum(axis=(1, 2))
    safe = np.maximum(area, MIN_AREA)  # empty frames (excluded later) get a finite centroid
    cx = np.where(area >= MIN_AREA, (weight * xs).sum(axis=(1, 2)) / safe, width / 2)
    cy = np.where(area >= MIN_AREA, (weight * ys).sum(axis=(1, 2)) / safe, height / 2)
    z = ((xs - cx[:, None, None]) + 1j * (ys - cy[:, None, None])).astype(np.complex64)  # (F, H, W)
    power = weight * z * z  # weight * z^k, built up one multiply at a time
    moments = []
    for k in (3, 4, 5):
        power = power * z
        moments.append(np.abs(power.sum(axis=(1, 2))) / safe ** (1 + k / 2))
    return area, cx, cy, np.stack(moments, axis=1)  # moments (F, 3)


def shape_scores(moments: np.ndarray) -> dict[str, float]:
    """Each symmetry moment (median over frames) relative to its own shape's value; empty without frames."""
    if len(moments) == 0:
        return {}
    median = np.median(moments, axis=0)
    return {name: float(median[k - 3] / value) for name, (k, value) in SHAPE_MOMENTS.items()}


def classify_shape(moments: np.ndarray) -> str:
    """The shape whose score is largest, if it reaches CIRCLE_BELOW; none large means a circle."""
    ratios = shape_scores(moments)
    if not ratios:
        return SHAPES[0]
    best = max(ratios, key=ratios.get)
    return best if ratios[best] >= CIRCLE_BELOW else "circle"


def _trend(values: np.ndarray) -> float:
    """Fitted change from the first frame to the last (least squares line over visible frames)."""
    if len(values) < 2:
        return 0.0
    t = np.linspace(0.0, 1.0, len(values))
    return float(np.polyfit(t, values, 1)[0])


def classify_motion(area: np.ndarray, cx: np.ndarray, cy: np.ndarray, side: int) -> tuple[str, float]:
    """Translation (fraction of the side) against growth (log area ratio), each relative to the slowest the
    dataset makes; returns the motion and how far it went in that unit."""
    dx, dy = _trend(cx) / side, _trend(cy) / side
    growth = _trend(np.log(np.maximum(area, MIN_AREA))) if len(area) else 0.0
    slowest_travel = SPEEDS["slowly"] * (1 - 2 * max(SIZES.values()) - 0.1)
    slowest_growth = 2 * math.log((1 + _growth("slowly") / 2) / (1 - _growth("slowly") / 2))
    if max(abs(dx), abs(dy)) / slowest_travel >= abs(growth) / slowest_growth:
        if abs(dx) >= abs(dy):
            return ("right" if dx > 0 else "left"), abs(dx)
        return ("down" if dy > 0 else "up"), abs(dy)
    return ("growing" if growth > 0 else "shrinking"), abs(growth)


def _growth(speed: str) -> float:
    return 0.45 * SPEEDS[speed] / 0.7  # as training.data.trajectory scales the radius


def classify_size(area: np.ndarray, shape: str, side: int) -> str:
    """Mean radius from the mean area (growth is symmetric about the nominal size), nearest on a log scale."""
    if len(area) == 0:
        return next(iter(SIZES))
    radius = math.sqrt(float(np.mean(area)) / AREA_PER_R2[shape]) / side
    return min(SIZES, key=lambda name: abs(math.log(max(radius, 1e-6) / SIZES[name])))


def classify_speed(motion: str, travel: float, area: np.ndarray, shape: str, side: int) -> str:
    """How far the motion went against what each speed would cover at the read size."""

    def expected(speed: str) -> float:
        if motion in ("growing", "shrinking"):
            return 2 * math.log((1 + _growth(speed) / 2) / (1 - _growth(speed) / 2))
        radius = SIZES[classify_size(area, shape, side)]
        return SPEEDS[speed] * (1 - 2 * radius - 0.1)

    return min(SPEEDS, key=lambda speed: abs(math.log(max(travel, 1e-6) / expected(speed))))


# ----------------------------------------------------------------------------------------------------------------------
# Degradation: what a generator does to a clip, for measuring the analyzer's robustness


def degrade(
    video: np.ndarray, rng: np.random.Generator, blur: float = 1.0, noise: float = 6.0, soften: int = 2
) -> np.ndarray:
    """A VAE-like softening (average-pool by `soften`, upsample, a box blur of the same width; a [1, 2, 1] blur over
    time), then a Gaussian blur of std `blur` px and Gaussian noise of std `noise` (0-255 units)."""
    clip = video.astype(np.float32)
    if soften > 1:
        frames, height, width, _ = clip.shape
        pooled = clip.reshape(frames, height // soften, soften, width // soften, soften, 3).mean(axis=(2, 4))
        clip = np.repeat(np.repeat(pooled, soften, axis=1), soften, axis=2)
        clip = ndimage.uniform_filter(clip, (1, soften, soften, 1), mode="nearest")
        clip = ndimage.convolve1d(clip, np.array([0.25, 0.5, 0.25], np.float32), axis=0, mode="nearest")
    if blur > 0:
        clip = ndimage.gaussian_filter(clip, (0, blur, blur, 0), mode="nearest")
    clip += noise * rng.standard_normal(clip.shape, dtype=np.float32)
    return np.clip(np.round(clip), 0, 255).astype(np.uint8)
