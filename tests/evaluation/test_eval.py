"""The evaluation: the analyzer's accuracy on rendered and degraded clips, the Frechet distance against closed
forms, the sharpness ratio, and a smoke run of `run_eval` on random-weight systems."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import warnings
import zlib

import numpy as np
import pytest

from aptserve.evaluation.analyzer import ATTRIBUTES, adherence, analyze, degrade
from aptserve.evaluation.cache import SystemCache, model_fingerprint
from aptserve.evaluation.config import EvalConfig, SystemSpec
from aptserve.evaluation.images import write_png
from aptserve.evaluation.metrics import frechet_distance, frechet_from_moments, sharpness_ratio
from aptserve.evaluation.report import run_eval
from aptserve.training.data import ShapeSpec, all_combinations, caption_grammar, named_attributes, render, spec_for

FRAMES = 25  # 2 s at 12 fps: half the frames of a real clip keeps the test fast; the analyzer is frame-rate free


@pytest.fixture(scope="module")
def rendered():
    """120 clips spread over every attribute: a seeded sample of all combinations at seeded positions."""
    combinations = all_combinations()
    pick = np.random.default_rng(0).permutation(len(combinations))[:120]
    specs = [spec_for(combinations[i], np.random.default_rng([1, int(i)])) for i in pick]
    return specs, [render(spec, FRAMES) for spec in specs]


def _accuracy(clips, specs) -> dict[str, float]:
    hits = [adherence(analyze(clip), spec) for clip, spec in zip(clips, specs)]
    return {name: float(np.mean([h[name] for h in hits])) for name in (*ATTRIBUTES, "background", "all")}


def test_analyzer_reads_rendered_clips(rendered):
    specs, clips = rendered
    assert {s.colour for s in specs} | {s.shape for s in specs} | {s.motion for s in specs} >= {"star", "up", "green"}
    acc = _accuracy(clips, specs)
    assert min(acc.values()) >= 0.95, f"analyzer accuracy on 120 rendered clips: {acc}"  # measured: all 100%


def test_analyzer_reads_degraded_clips(rendered):
    specs, clips = rendered
    noisy = [degrade(c, np.random.default_rng([2, i]), blur=1.5, noise=10.0, soften=2) for i, c in enumerate(clips)]
    acc = _accuracy(noisy, specs)
    assert min(acc.values()) >= 0.9, f"analyzer accuracy on 120 degraded clips: {acc}"  # measured: all 100%


def test_analyzer_on_garbage_does_not_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or NaN on clips a random generator makes
        assert analyze(np.full((9, 64, 64, 3), 120, np.uint8)).visible_frames == 0
        analyze(np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8))


def test_frechet_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=4), rng.normal(size=4)
    var_a, var_b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_from_moments(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, rel=1e-9)
    # cov_b = c^2 cov_a for a full covariance: Tr(cov_a) (1 - c)^2
    m = rng.normal(size=(4, 4))
    cov = m @ m.T + 0.1 * np.eye(4)
    assert frechet_from_moments(mu_a, cov, mu_a, 9 * cov) == pytest.approx(4 * np.trace(cov), rel=1e-7)


def test_frechet_on_samples():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + 1  # mean 1, std 2: 3 * 1 + 3 * (2 - 1)^2 = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    assert frechet_distance(a[:50], a[:50]) == pytest.approx(0.0, abs=1e-6)
    small = rng.normal(size=(8, 16))  # fewer samples than dimensions: singular covariances, still finite
    assert np.isfinite(frechet_distance(small, small[::-1])) and frechet_distance(small, small) < 1e-4
    with pytest.raises(ValueError):
        frechet_distance(a[:, :2], b)


def test_sharpness_ratio(rendered):
    _, clips = rendered
    real = np.stack(clips[:8])
    blurred = np.stack([degrade(c, np.random.default_rng(0), blur=1.5, noise=0.0, soften=1) for c in real])
    assert sharpness_ratio(real, real) == pytest.approx(1.0)
    assert sharpness_ratio(blurred, real) < 0.5


def test_write_png_is_valid(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = write_png(tmp_path / "x.png", image).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (7, 5)
    raw = zlib.decompress(data[41:-16])  # IDAT payload: after signature + IHDR (33 bytes) and its own 8-byte header
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(5, 22)[:, 1:].reshape(5, 7, 3), image)


def test_config_from_dicts_and_errors():
    cfg = EvalConfig(systems=({"name": "a", "model": "tiny", "steps": 2},))
    assert cfg.systems == (SystemSpec("a", "tiny", 2),)
    with pytest.raises(ValueError, match="bad system"):
        EvalConfig(systems=({"name": "a", "model": "tiny", "stepz": 2},))
    with pytest.raises(ValueError):
        EvalConfig(prompts=0)
    with pytest.raises(ValueError, match="prompt must be one of"):
        EvalConfig(systems=({"name": "a", "model": "tiny", "prompt": "long"},))


def test_short_prompts_name_colour_shape_and_motion_only(tmp_path):
    spec = ShapeSpec("red", "circle", "left", "black", "large", "slowly")
    assert SystemSpec("a", "tiny").caption(spec) == spec.caption
    assert SystemSpec("a", "tiny", prompt="short").caption(spec) == "a red circle moving left"
    cache = SystemCache(EvalConfig(cache=str(tmp_path)))
    full, short = SystemSpec("a", "tiny"), SystemSpec("a", "tiny", prompt="short")
    assert cache._path(full) != cache._path(short)
    described = {"name": "a", "model": "tiny", "steps": 1, "guidance": None}  # the key before `prompt` existed
    key = {**cache.common, "system": described, "model": "tiny"}
    assert cache._path(full).name == "a-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def test_run_eval_smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, docs/) land in the temporary folder
    cfg = EvalConfig(
        systems=(
            SystemSpec("random 1 step", "tiny", 1),
            SystemSpec("random 3 steps", "tiny", 3, guidance=1.0),  # scale 1: no unconditional pass to pay for
            SystemSpec("missing", "models/no-such-checkpoint", 1),
        ),
        prompts=4,
        size="32x32",  # and 13 frames: the random-weight VAE decode is most of this test's time
        seconds=0.5,
        batch_size=4,
        real_clips=16,
        classifier_epochs=1,
        classifier_batch=8,
        sheet_prompts=2,
    )
    table = run_eval(cfg, progress=False)
    text = table.read_text()
    assert "| random 1 step | 1 | — |" in text and "| random 3 steps | 3 | 1 |" in text
    assert "| missing | 1 | — | — |" in text and "skipped **missing**" in text and "no-such-checkpoint" in text
    report = json.loads(table.with_suffix(".json").read_text())
    assert set(report["systems"]) == {"random 1 step", "random 3 steps"}
    assert set(report["analyzer"]["real"]) == {"colour", "shape", "motion", "all"}
    for result in report["systems"].values():
        assert np.isfinite(result["frechet"]) and result["sharpness"] > 0 and result["seconds_per_clip"] > 0
    for name in ("real", "random-1-step", "random-3-steps"):
        data = (tmp_path / "docs" / "quality" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", data[16:24]) == (2 * (5 * 34 + 2), 2 * (2 * 34 + 2))  # 5 frames x 2 prompts
        assert "quality/" + name + ".png" in text
    classifier = tmp_path / "runs" / "eval-classifier.pt"
    trained_at = classifier.stat().st_mtime_ns
    again = run_eval(dataclasses.replace(cfg, systems=cfg.systems[2:]), progress=False)
    assert classifier.stat().st_mtime_ns == trained_at  # the cached classifier, not a retrained one
    assert json.loads(again.with_suffix(".json").read_text())["real"] == report["real"]


def test_system_cache_reuses_results_until_the_checkpoint_changes(tmp_path, monkeypatch):
    from aptserve.engines.config import MODEL_PRESETS
    from aptserve.engines.loading import random_model, save_checkpoint
    from aptserve.evaluation.generate import PipelineCache

    monkeypatch.chdir(tmp_path)
    config = MODEL_PRESETS["tiny"]
    save_checkpoint(
        "models/a", config, {"dit": random_model(config, seed=1).dit, "vae": random_model(config, seed=1).vae}
    )
    cfg = EvalConfig(
        systems=(SystemSpec("a 1 step", "models/a", 1), SystemSpec("preset", "tiny", 1)),
        prompts=2,
        size="32x32",
        seconds=0.5,
        batch_size=2,
        real_clips=8,
        classifier_epochs=1,
        classifier_batch=8,
        sheet_prompts=1,
    )
    first = json.loads(run_eval(cfg, progress=False).with_suffix(".json").read_text())
    fingerprint = model_fingerprint("models/a")
    assert len(fingerprint) == 64 and model_fingerprint("tiny") == "tiny"
    # a caption grammar added to the config changes what prompt-completing systems depend on, not the others
    config_file = tmp_path / "models" / "a" / "config.json"
    written, as_written = config_file.read_text(), model_fingerprint("models/a", prompt_grammar=False)
    config_file.write_text(
        json.dumps({**json.loads(written), "prompt_grammar": caption_grammar().to_dict()}, indent=2) + "\n"
    )
    assert model_fingerprint("models/a", prompt_grammar=False) == as_written
    assert model_fingerprint("models/a") != fingerprint
    config_file.write_text(written)

    generated = []
    real_get = PipelineCache.get
    monkeypatch.setattr(PipelineCache, "get", lambda self, model: generated.append(model) or real_get(self, model))
    again = json.loads(run_eval(cfg, progress=False).with_suffix(".json").read_text())
    assert generated == [] and again["systems"] == first["systems"]  # everything from the cache
    assert (tmp_path / "docs" / "quality" / "a-1-step.png").is_file()

    save_checkpoint(
        "models/a", config, {"dit": random_model(config, seed=2).dit, "vae": random_model(config, seed=2).vae}
    )  # new weights, same folder
    assert model_fingerprint("models/a") != fingerprint
    only = json.loads(run_eval(cfg, progress=False, only=("preset",)).with_suffix(".json").read_text())
    assert generated == [] and set(only["systems"]) == {"preset"}  # the stale system is not regenerated ...
    assert "not selected" in only["skipped"]["a 1 step"]
    run_eval(cfg, progress=False)
    assert generated == ["models/a"]  # ... until it is asked for
    with pytest.raises(ValueError, match="no such systems"):
        run_eval(cfg, progress=False, only=("nope",))


def test_named_attributes_reads_free_form_prompts():
    assert named_attributes("a red circle moving left") == {"colour": "red", "shape": "circle", "motion": "left"}
    full = "A large purple star shrinking slowly on a gray background"
    assert named_attributes(full) == {
        "colour": "purple",
        "shape": "star",
        "motion": "shrinking",
        "background": "gray",
        "size": "large",
        "speed": "slowly",
    }
    assert named_attributes("something else entirely") == {}
