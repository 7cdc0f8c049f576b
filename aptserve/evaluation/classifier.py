"""The feature classifier behind the Frechet distance: a small video CNN trained on rendered real clips, cached at
`EvalConfig.classifier` under a key of the settings it was trained with."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aptserve.engines.config import parse_size
from aptserve.evaluation.config import EvalConfig
from aptserve.training.data import COLOURS, MOTIONS, SHAPES, ShapeSpec, shapes_sample

log = logging.getLogger(__name__)
LABELS = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS}  # the classifier's three heads
CLASSIFIER_FRAMES = 7  # every 8th frame of 49: what the classifier sees (also what its training clips render)
CLASSIFIER_SIZE = 64
CLASSIFIER_DATA_SEED = 12345  # its training clips: training-split samples of this seed


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
