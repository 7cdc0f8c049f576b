"""Scores over sets of clips: adherence rates, the Frechet distance of two feature sets, and sharpness against real
clips. Plain numpy and scipy; no I/O."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.stats

from aptserve.evaluation.analyzer import ATTRIBUTES


def accuracy(hits: list[dict[str, bool]], names: tuple[str, ...] = (*ATTRIBUTES, "all")) -> dict[str, float]:
    """The share of clips that hit each of `names`; empty without clips."""
    return {name: float(np.mean([h[name] for h in hits])) for name in names} if hits else {}


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


# Bootstrap intervals over prompts. Every system is resampled with the same clip indices (one seeded draw), and a
# generated clip is always drawn together with the real clip of its prompt, so the replicates of two systems on the
# same prompts and seeds pair up: their differences and ratios give the paired comparison's intervals.


def bootstrap_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) clip indices drawn with replacement; the same for a seed."""
    if n < 2 or resamples < 1:
        raise ValueError(f"bootstrap needs n >= 2 clips and resamples >= 1; got {n} and {resamples}")
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def cluster_indices(prompt_indices: np.ndarray, draws: int) -> np.ndarray:
    """Clip indices (R, P * draws) of prompt resamples (R, P): a drawn prompt brings every draw of it along (clip
    d * P + p is draw d of prompt p), so the draws of one prompt, which share its caption, are never split."""
    prompts = prompt_indices.shape[1]
    return np.concatenate([prompt_indices + d * prompts for d in range(draws)], axis=1)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate: successes of n trials."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got {successes} of {n}")
    z = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _batched_moments(feats: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (R, D) and covariance (R, D, D) of `feats[indices[r]]` for each resample r."""
    drawn = feats[indices]  # (R, N, D)
    mu = drawn.mean(axis=1)
    centred = drawn - mu[:, None, :]
    return mu, centred.transpose(0, 2, 1) @ centred / (indices.shape[1] - 1)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))[..., None, :]) @ np.swapaxes(vectors, -1, -2)


def frechet_batched(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> np.ndarray:
    """`frechet_from_moments` over stacks (R, D) and (R, D, D), by symmetric eigendecompositions:
    Tr (cov_a cov_b)^(1/2) = sum of the square roots of the eigenvalues of cov_a^(1/2) cov_b cov_a^(1/2)."""
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + np.swapaxes(middle, -1, -2)) / 2  # symmetric up to round-off
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum(axis=-1)
    diff = mu_a - mu_b
    trace = np.trace(cov_a, axis1=-2, axis2=-1) + np.trace(cov_b, axis1=-2, axis2=-1)
    return np.maximum(np.einsum("rd,rd->r", diff, diff) + trace - 2 * trace_sqrt, 0.0)


def frechet_replicates(feats: np.ndarray, real: np.ndarray, indices: np.ndarray, chunk: int = 100) -> np.ndarray:
    """(R,) Frechet distances between `feats[idx]` and `real[idx]` for each resample idx (rows paired by prompt)."""
    feats, real = np.asarray(feats, np.float64), np.asarray(real, np.float64)
    if feats.shape != real.shape or feats.ndim != 2 or indices.max(initial=0) >= len(feats):
        raise ValueError(f"need two (N, D) feature sets paired by prompt; got {feats.shape} and {real.shape}")
    out = [
        frechet_batched(*_batched_moments(feats, part), *_batched_moments(real, part))
        for part in np.array_split(indices, max(1, -(-len(indices) // chunk)))
    ]
    return np.concatenate(out)


def mean_replicates(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(R,) means of `values[idx]` (per-clip hits or readings) for each resample idx."""
    return np.asarray(values, np.float64)[indices].mean(axis=1)


def percentile_interval(
    replicates: np.ndarray, confidence: float = 0.9, estimate: float | None = None
) -> tuple[float, float]:
    """The central `confidence` percentile interval of bootstrap replicates; given the full-sample `estimate`, shifted
    by the bootstrap's bias (the replicates' mean minus the estimate) so that it is centred on the estimate's own
    spread. A Frechet distance needs the shift: resampled sets repeat clips, which adds to the fitted covariances'
    mismatch, so its replicates sit well above the estimate (by about as much as the estimate sits above the
    distance of infinitely many prompts)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    bias = 0.0 if estimate is None else float(np.mean(replicates)) - estimate
    return float(low) - bias, float(high) - bias


def paired_intervals(
    a: np.ndarray, b: np.ndarray, confidence: float = 0.9, estimates: tuple[float, float] | None = None
) -> dict[str, tuple[float, float]]:
    """Intervals of b - a, and of b / a when every replicate of a is positive, from replicates of two systems drawn
    with the same indices; given the two full-sample `estimates`, bias-shifted as in `percentile_interval`."""
    if a.shape != b.shape:
        raise ValueError(f"paired replicates must match; got {a.shape} and {b.shape}")
    est_a, est_b = estimates if estimates is not None else (None, None)
    difference = None if estimates is None else est_b - est_a
    intervals = {"difference": percentile_interval(b - a, confidence, difference)}
    if (a > 0).all():  # a ratio is read for positive scores only (Frechet distances)
        ratio = None if estimates is None else est_b / est_a
        intervals["ratio"] = percentile_interval(b / a, confidence, ratio)
    return intervals


def verdict(interval: tuple[float, float], bounds: tuple[float, float]) -> str:
    """The three-valued check of a claim: "held" when `interval` lies inside `bounds`, "failed" when the two do not
    meet, else "undecided".

    With a 90% interval of the paired difference b - a and bounds the spread of a's own 90% interval around its
    estimate, "held" is the claim "b is within a's interval" passing two one-sided 5% tests (an equivalence test)."""
    (low, high), (lower, upper) = interval, bounds
    if lower <= low and high <= upper:
        return "held"
    if high < lower or low > upper:
        return "failed"
    return "undecided"
