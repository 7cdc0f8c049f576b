"""Contact sheets: a few frames of the first prompts' clips per system, written as PNGs with zlib and struct only."""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from aptserve.evaluation.config import EvalConfig

SHEET_FRAMES = 5  # frames 0, 12, 24, 36, 48 of a 49-frame clip


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


def write_sheet(cfg: EvalConfig, name: str, rows: list[np.ndarray]) -> str:
    path = write_png(Path(cfg.sheets) / f"{slug(name)}.png", contact_sheet(rows))
    return os.path.relpath(path, cfg.links_relative_to)
