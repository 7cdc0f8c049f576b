"""Mode purity: does a clip commit to one value of what its prompt leaves open, or blend several?

A shapes clip is made of two colours: one background from BACKGROUNDS and one object colour from COLOURS, mixed
only along the object's anti-aliased edge. A generator that regresses toward the mean of the clips a prompt allows
paints mixtures instead: a background between two backgrounds, an object at half strength (two half-drawn
positions or shapes), a texture of the object's colour and a background over the whole frame. The purity of a clip
reads every pixel against the clip's own two-colour model (the palette background nearest its border, the palette
colour whose blend line with that background best explains its most distinct pixels), with no learned parts:

- explained: of the pixels farther than PIXEL_TOLERANCE from that background, the share within PIXEL_TOLERANCE of
  the segment from the background to the object colour (the object, and blends of the two as on an edge);
- solid: of the pixels at least a quarter of the way from the background to the object colour, the share at least
  three quarters of the way (an anti-aliased or softened edge is a thin ring; a half-strength object is all ring);
- background: how far the border colour is from the nearest palette background;
- visible: the share of frames with an object at all.

A clip is pure when all four pass their thresholds (PURE). The thresholds admit real clips, the degradation the
analyzer's robustness is reported on, and the VAE's round trip (tests/evaluation/test_purity.py measures each), and
reject a 50/50 pixel average of two valid clips, which is what averaging two modes looks like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aptserve.evaluation.analyzer import MIN_AREA, border_colour, core_colour, nearest_colour
from aptserve.training.data import BACKGROUNDS, COLOURS

PIXEL_TOLERANCE = 40.0  # RGB distance (0-255) from the clip's blend segment within which a pixel is explained
# A clip is pure when it reaches every bound (explained, solid and visible at least, background at most).
PURE = {"explained": 0.8, "solid": 0.35, "background": 30.0, "visible": 0.8}
_PALETTE_BACKGROUNDS = np.array(list(BACKGROUNDS.values()), np.float32)


@dataclass(frozen=True)
class Purity:
    explained: float
    solid: float
    background: float
    visible: float

    @property
    def pure(self) -> bool:
        return (
            self.explained >= PURE["explained"]
            and self.solid >= PURE["solid"]
            and self.background <= PURE["background"]
            and self.visible >= PURE["visible"]
        )


def purity(video: np.ndarray) -> Purity:
    """uint8 (F, H, W, 3) -> how cleanly the clip is one palette object on one palette background."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a clip of shape (F, H, W, 3); got {video.shape}")
    pixels = video.astype(np.float32)
    border = border_colour(pixels)
    offsets = _PALETTE_BACKGROUNDS - border
    nearest = int(np.argmin(np.einsum("kc,kc->k", offsets, offsets)))
    background = _PALETTE_BACKGROUNDS[nearest]
    colour = np.array(COLOURS[nearest_colour(core_colour(pixels, border), border)], np.float32)
    direction = colour - background
    away = pixels - background
    along = np.clip(away @ direction / float(direction @ direction), 0.0, 1.0)  # (F, H, W)
    residual = away - along[..., None] * direction
    explained = np.einsum("...c,...c->...", residual, residual) <= PIXEL_TOLERANCE**2
    foreground = np.einsum("...c,...c->...", away, away) > PIXEL_TOLERANCE**2
    on_line = explained & (along >= 0.25)
    solid = on_line & (along >= 0.75)
    area = solid.sum(axis=(1, 2))
    return Purity(
        explained=float((explained & foreground).sum() / max(int(foreground.sum()), 1)),
        solid=float(solid.sum() / max(int(on_line.sum()), 1)),
        background=float(np.sqrt(offsets[nearest] @ offsets[nearest])),
        visible=float(np.mean(area >= MIN_AREA)),
    )
