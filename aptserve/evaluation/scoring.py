"""What is kept of a set of clips (analyzer readings, classifier features, sharpness, contact-sheet frames), the
summary row it scores to against the real clips of the same prompts, and its bootstrap intervals over prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aptserve.evaluation.analyzer import ATTRIBUTES, adherence, analyze, degrade
from aptserve.evaluation.classifier import LABELS, ClipClassifier, classify, label_tensor
from aptserve.evaluation.config import DEGRADE, EvalConfig
from aptserve.evaluation.images import SHEET_FRAMES
from aptserve.evaluation.metrics import (
    accuracy,
    frechet_distance,
    frechet_replicates,
    laplacian_energy,
    mean_replicates,
    paired_intervals,
    percentile_interval,
    verdict,
    wilson_interval,
)
from aptserve.evaluation.purity import Purity, purity
from aptserve.training.data import ShapeSpec

PURITY_PARTS = ("explained", "solid", "background", "visible")

# What intervals are reported for: adherence rates, the mode purity rate and the Frechet distance.
SCORES = (*ATTRIBUTES, "all", "purity", "frechet")
RATES = (*ATTRIBUTES, "all", "purity")


@dataclass
class ClipSet:
    """What is kept of a system's clips: analyzer hits, classifier features and hits, sharpness, sheet frames."""

    hits: list[dict[str, bool]] = field(default_factory=list)
    degraded_hits: list[dict[str, bool]] = field(default_factory=list)
    classifier_hits: list[dict[str, bool]] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    energy: list[np.ndarray] = field(default_factory=list)
    purities: list[Purity] = field(default_factory=list)
    sheet: list[np.ndarray] = field(default_factory=list)  # (SHEET_FRAMES, H, W, 3) per sheet prompt
    seconds: float = 0.0

    def add(self, clips: np.ndarray, specs: list[ShapeSpec], model: ClipClassifier, cfg: EvalConfig) -> None:
        self.hits += [adherence(analyze(clip), spec) for clip, spec in zip(clips, specs)]
        self.purities += [purity(clip) for clip in clips]
        feats, predicted = classify(model, clips)
        self.features.append(feats)
        truth = {name: value.numpy() for name, value in label_tensor(specs).items()}
        self.classifier_hits += [
            {name: bool(predicted[name][i] == truth[name][i]) for name in LABELS} for i in range(len(specs))
        ]
        self.energy.append(laplacian_energy(clips))
        index = np.round(np.linspace(0, clips.shape[1] - 1, SHEET_FRAMES)).astype(int)
        self.sheet += [clip[index] for clip in clips[: max(0, cfg.sheet_prompts - len(self.sheet))]]

    def per_clip(self) -> dict[str, np.ndarray]:
        """What the bootstrap needs, in clip order (draw after draw): features (N, D), the analyzer's hits (N, 4) on
        colour, shape, motion and all three, and each clip's purity (N,)."""
        hits = np.array([[h[name] for name in (*ATTRIBUTES, "all")] for h in self.hits], bool).reshape(-1, 4)
        pure = np.array([p.pure for p in self.purities], bool)
        return {"features": np.concatenate(self.features).astype(np.float32), "hits": hits, "purity": pure}

    def add_degraded(self, clips: np.ndarray, specs: list[ShapeSpec], seed: int) -> None:
        first = len(self.degraded_hits)
        for i, (clip, spec) in enumerate(zip(clips, specs)):
            noisy = degrade(clip, np.random.default_rng([seed, first + i]), **DEGRADE)
            self.degraded_hits.append(adherence(analyze(noisy), spec))


def summarise(system: ClipSet, real: ClipSet) -> dict:
    feats, real_feats = np.concatenate(system.features), np.concatenate(real.features)
    parts = {name: float(np.mean([getattr(p, name) for p in system.purities])) for name in PURITY_PARTS}
    return {
        "adherence": accuracy(system.hits),
        "purity": float(np.mean([p.pure for p in system.purities])),
        "purity_parts": parts,
        "clips": len(system.hits),
        "adherence_extra": accuracy(system.hits, ("background", "size", "speed")),
        "classifier_adherence": accuracy(system.classifier_hits, tuple(LABELS)),
        "frechet": frechet_distance(feats, real_feats),
        "sharpness": float(np.concatenate(system.energy).mean() / np.concatenate(real.energy).mean()),
        "seconds_per_clip": system.seconds / max(len(system.hits), 1),
    }


def replicates(clips: dict[str, np.ndarray], real: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Bootstrap replicates (R,) of each score in SCORES, from per-clip readings paired by prompt with `real`'s."""
    reps = {name: mean_replicates(clips["hits"][:, i], indices) for i, name in enumerate((*ATTRIBUTES, "all"))}
    reps["purity"] = mean_replicates(clips["purity"], indices)
    reps["frechet"] = frechet_replicates(clips["features"], real["features"], indices)
    return reps


def intervals(
    reps: dict[str, np.ndarray], points: dict[str, float], confidence: float
) -> dict[str, tuple[float, float]]:
    """Each score's interval around its estimate in `points`."""
    return {name: percentile_interval(values, confidence, points[name]) for name, values in reps.items()}


def compare(
    point_a: dict[str, float],
    point_b: dict[str, float],
    reps_a: dict[str, np.ndarray],
    reps_b: dict[str, np.ndarray],
    confidence: float,
) -> dict[str, dict]:
    """Per score, the paired comparison of system b with the reference a on the same prompts and seeds: both
    estimates and intervals, the intervals of b - a (and b / a), whether b's estimate lies in a's interval, and
    the verdict on "b is within a's interval": the difference's interval against a's interval around a's estimate."""
    out = {}
    for name in SCORES:
        a, b = point_a[name], point_b[name]
        a_int = percentile_interval(reps_a[name], confidence, a)
        b_int = percentile_interval(reps_b[name], confidence, b)
        paired = paired_intervals(reps_a[name], reps_b[name], confidence, (a, b))
        out[name] = {
            "a": a,
            "b": b,
            "a_interval": a_int,
            "b_interval": b_int,
            **paired,
            "b_in_a_interval": a_int[0] <= b <= a_int[1],
            "difference_contains_0": paired["difference"][0] <= 0 <= paired["difference"][1],
            "verdict": verdict(paired["difference"], (a_int[0] - a, a_int[1] - a)),
        }
    return out


def point_scores(summary: dict) -> dict[str, float]:
    """The estimates of SCORES from a summary row."""
    adherence = {name: summary["adherence"][name] for name in (*ATTRIBUTES, "all")}
    return {**adherence, "purity": summary["purity"], "frechet": summary["frechet"]}


def rate_intervals(summary: dict, confidence: float) -> dict[str, tuple[float, float]]:
    """Wilson score intervals of the adherence and purity rates over the summary's clips (each clip one trial)."""
    n = summary["clips"]
    return {
        name: wilson_interval(round(rate * n), n, confidence)
        for name, rate in point_scores(summary).items()
        if name in RATES
    }


def claim_verdict(interval: tuple[float, float], test: str, bound: float) -> str:
    """ "holds" when the whole interval is on the claimed side of the bound, "fails" when none of it is,
    "undecided" when it straddles the bound."""
    low, high = interval
    below = test.endswith("below")
    if (high < bound) if below else (low > bound):
        return "holds"
    if (low >= bound) if below else (high <= bound):
        return "fails"
    return "undecided"
