"""Scores over sets of clips: adherence rates, the Frechet distance of two feature sets, and sharpness against real
clips. Plain numpy and scipy; no I/O."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

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
