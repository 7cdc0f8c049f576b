"""Mode purity is validated on what it must tell apart: rendered clips, their degraded copies and the shipped VAE's
round trip are pure; a 50/50 pixel average of two valid clips, what a generator averaging two modes draws, is not.
Also the binomial and clustered-bootstrap pieces the evaluation's intervals rest on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aptserve.engines.pipeline import to_uint8
from aptserve.evaluation.analyzer import degrade
from aptserve.evaluation.config import DEGRADE
from aptserve.evaluation.generate import eval_specs
from aptserve.evaluation.metrics import bootstrap_indices, cluster_indices, wilson_interval
from aptserve.evaluation.purity import purity
from aptserve.evaluation.scoring import claim_verdict
from aptserve.training.data import BACKGROUNDS, COLOURS, render, to_tensor

N = 48


@pytest.fixture(scope="module")
def clips() -> tuple[list, np.ndarray]:
    specs = eval_specs(N, 0)
    return specs, np.stack([render(spec, 25, 64, 64) for spec in specs])


def blend(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.round((a.astype(np.float32) + b) / 2).astype(np.uint8)


def test_rendered_and_degraded_clips_are_pure(clips):
    _, videos = clips
    assert all(purity(v).pure for v in videos)
    rng = np.random.default_rng(0)
    assert all(purity(degrade(v, rng, **DEGRADE)).pure for v in videos)


def test_the_shipped_vae_round_trip_is_pure():
    """At the evaluation's clip length (49 frames, which the VAE was trained at)."""
    from aptserve.evaluation.generate import load_vae

    vae = load_vae("models/shapes-vae-tiny")
    videos = [render(spec, 49, 64, 64) for spec in eval_specs(12, 0)]
    with torch.inference_mode():
        round_trip = to_uint8(vae.decode(vae.encode(torch.stack([to_tensor(v) for v in videos]))))
    assert all(purity(v).pure for v in round_trip)


def test_blends_of_two_valid_clips_are_impure(clips):
    """Pairs that differ in what a short prompt leaves open or in the object: at most 1 in 20 passes."""
    specs, videos = clips
    pairs = [(i, (i + 1) % N) for i in range(N)]
    impure = [not purity(blend(videos[i], videos[j])).pure for i, j in pairs]
    assert np.mean(impure) >= 0.95
    # two backgrounds whose average is near the third: the ghost objects still give it away
    black, white = (
        next(i for i, s in enumerate(specs) if s.background == name and s.colour == "red")
        for name in ("black", "white")
    )
    mixed = purity(blend(videos[black], videos[white]))
    assert not mixed.pure and mixed.explained < 0.8


def test_half_strength_ghosts_of_one_clip_are_impure():
    """The same clip at two positions that do not overlap (a generator undecided between two starts)."""
    base = eval_specs(1, 0)[0]
    left = render(base.__class__(**{**base.__dict__, "x0": 0.3, "y0": 0.5, "motion": "up"}), 25, 64, 64)
    right = render(base.__class__(**{**base.__dict__, "x0": 0.72, "y0": 0.5, "motion": "up"}), 25, 64, 64)
    assert purity(left).pure and purity(right).pure
    ghosts = purity(blend(left, right))
    assert not ghosts.pure and ghosts.solid < 0.35


def test_texture_and_empty_clips_are_impure():
    rng = np.random.default_rng(0)
    palette = np.array([*COLOURS.values(), *BACKGROUNDS.values()], np.uint8)
    texture = palette[rng.integers(0, len(palette), (25, 64, 64))]
    assert not purity(texture).pure
    flat = np.full((25, 64, 64, 3), BACKGROUNDS["gray"], np.uint8)
    assert purity(flat).visible == 0.0 and not purity(flat).pure


def test_wilson_interval():
    low, high = wilson_interval(50, 100, 0.95)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_cluster_indices_keep_every_draw_of_a_drawn_prompt():
    prompts = bootstrap_indices(5, 3, seed=1)
    clusters = cluster_indices(prompts, 3)
    assert clusters.shape == (3, 15)
    for r in range(3):
        for d in range(3):
            assert np.array_equal(clusters[r, d * 5 : (d + 1) * 5], prompts[r] + 5 * d)


def test_claim_verdicts():
    assert claim_verdict((0.6, 0.9), "ratio_below", 1.0) == "holds"
    assert claim_verdict((0.9, 1.1), "ratio_below", 1.0) == "undecided"
    assert claim_verdict((1.0, 1.3), "ratio_below", 1.0) == "fails"
    assert claim_verdict((0.02, 0.1), "difference_above", 0.0) == "holds"
    assert claim_verdict((-0.1, -0.01), "difference_above", 0.0) == "fails"
    assert claim_verdict((0.95, 1.2), "ratio_above", 0.9) == "holds"
