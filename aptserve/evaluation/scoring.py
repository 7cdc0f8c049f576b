"""What is kept of a set of clips (analyzer readings, classifier features, sharpness, contact-sheet frames) and the
summary row it scores to against the real clips of the same prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aptserve.evaluation.analyzer import adherence, analyze, degrade
from aptserve.evaluation.classifier import LABELS, ClipClassifier, classify, label_tensor
from aptserve.evaluation.config import DEGRADE, EvalConfig
from aptserve.evaluation.images import SHEET_FRAMES
from aptserve.evaluation.metrics import accuracy, frechet_distance, laplacian_energy
from aptserve.training.data import ShapeSpec


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
