"""The evaluation: the analyzer's accuracy on rendered and degraded clips, the Frechet distance against closed
forms, the sharpness ratio, bootstrap intervals and paired comparisons, systems with run options, and a smoke run of
`run_eval` on random-weight systems."""

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
from aptserve.evaluation.config import ClaimSpec, EvalConfig, SystemSpec
from aptserve.evaluation.images import write_png
from aptserve.evaluation.metrics import (
    bootstrap_indices,
    frechet_batched,
    frechet_distance,
    frechet_from_moments,
    frechet_replicates,
    mean_replicates,
    paired_intervals,
    percentile_interval,
    sharpness_ratio,
    verdict,
)
from aptserve.evaluation.report import run_eval
from aptserve.kernels._triton import INTERPRETED
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


def test_bootstrap_indices_are_seeded():
    a, b = bootstrap_indices(50, 200, seed=3), bootstrap_indices(50, 200, seed=3)
    assert a.shape == (200, 50) and a.min() >= 0 and a.max() < 50 and np.array_equal(a, b)
    assert not np.array_equal(a, bootstrap_indices(50, 200, seed=4))
    with pytest.raises(ValueError):
        bootstrap_indices(1, 10)


def test_frechet_batched_matches_sqrtm():
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6) for _ in range(6)]
    mus, covs = np.stack([f.mean(0) for f in feats]), np.stack([np.cov(f, rowvar=False) for f in feats])
    batched = frechet_batched(mus[:3], covs[:3], mus[3:], covs[3:])
    expected = [frechet_from_moments(mus[i], covs[i], mus[3 + i], covs[3 + i]) for i in range(3)]
    assert batched == pytest.approx(expected, rel=1e-8)
    small = rng.normal(size=(8, 16))  # fewer samples than dimensions: singular covariances
    everything = np.arange(8)[None]
    assert frechet_replicates(small, small[::-1], everything)[0] == pytest.approx(
        frechet_distance(small, small[::-1]), rel=1e-6
    )


def test_paired_intervals_of_identical_systems_have_zero_width():
    rng = np.random.default_rng(0)
    feats, real, hits = rng.normal(size=(64, 5)), rng.normal(size=(64, 5)), rng.random(64) < 0.4
    indices = bootstrap_indices(64, 300, seed=0)
    for reps in (frechet_replicates(feats, real, indices), mean_replicates(hits, indices)):
        paired = paired_intervals(reps, reps.copy())
        assert paired["difference"] == (0.0, 0.0)
        assert verdict(paired["difference"], (-1e-9, 1e-9)) == "held"
    assert paired_intervals(reps, reps)["ratio"] == (1.0, 1.0)
    again = frechet_replicates(feats, real, bootstrap_indices(64, 300, seed=0))  # deterministic for a seed
    assert np.array_equal(again, frechet_replicates(feats, real, indices))


def test_paired_intervals_exclude_0_for_a_shift():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(128, 4))
    near = real + 0.3 * rng.normal(size=real.shape)  # generated clips close to their prompts' real clips ...
    far = near + 0.5  # ... and the same clips shifted: a larger distance on every resample
    indices = bootstrap_indices(128, 300, seed=0)
    a, b = frechet_replicates(near, real, indices), frechet_replicates(far, real, indices)
    low, high = paired_intervals(a, b)["difference"]
    assert 0 < low < high and low > 0.5  # |shift|^2 = 4 * 0.25 = 1
    assert paired_intervals(a, b)["ratio"][0] > 1
    hits_a = rng.random(128) < 0.5
    hits_b = hits_a | (rng.random(128) < 0.3)  # more hits, never fewer
    diff = paired_intervals(mean_replicates(hits_a, indices), mean_replicates(hits_b, indices))["difference"]
    assert diff[0] > 0


def test_frechet_intervals_are_centred_on_the_estimate():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(128, 16))
    feats = 0.8 * real + 0.6 * rng.normal(size=real.shape)
    reps = frechet_replicates(feats, real, bootstrap_indices(128, 400, seed=0))
    estimate, (raw_low, raw_high) = frechet_distance(feats, real), percentile_interval(reps, 0.9)
    low, high = percentile_interval(reps, 0.9, estimate)
    assert reps.mean() > estimate and low < estimate < high  # repeated clips bias the replicates upward
    assert raw_low - low == pytest.approx(reps.mean() - estimate) and raw_high - high == pytest.approx(raw_low - low)


def test_paired_frechet_difference_coverage():
    """Coverage sanity of the paired Frechet difference over 128 prompts: its 90% interval holds the mean difference
    of many independent prompt sets about 90% of the time (its spread matches; the shift removes its bias)."""
    mixing = np.random.default_rng(0).normal(size=(8, 8)) / np.sqrt(8)

    def draw(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        real = rng.normal(size=(128, 8))
        a = 0.7 * real + rng.normal(size=real.shape) @ mixing + 0.3
        return real, a, a + 0.3 * rng.normal(size=real.shape)  # b: a with more noise, so farther from real

    def difference(real, a, b) -> float:
        return frechet_distance(b, real) - frechet_distance(a, real)

    truth = np.mean([difference(*draw(seed)) for seed in range(1000, 1400)])
    indices, covered = bootstrap_indices(128, 300, seed=0), []
    for seed in range(60):
        real, a, b = draw(seed)
        reps_a, reps_b = frechet_replicates(a, real, indices), frechet_replicates(b, real, indices)
        estimates = (frechet_distance(a, real), frechet_distance(b, real))
        low, high = paired_intervals(reps_a, reps_b, 0.9, estimates)["difference"]
        covered.append(low <= truth <= high)
    assert truth > 0 and 0.75 <= np.mean(covered) <= 1.0  # 60 trials: binomial sd 0.04 around 0.9


def test_bootstrap_interval_coverage():
    """Coverage sanity: 90% intervals of a hit rate over 200 prompts contain the true rate about 90% of the time."""
    rng = np.random.default_rng(0)
    indices = bootstrap_indices(200, 400, seed=1)
    spans = [percentile_interval(mean_replicates(rng.random(200) < 0.3, indices), 0.9) for _ in range(300)]
    coverage = np.mean([low <= 0.3 <= high for low, high in spans])
    assert 0.84 <= coverage <= 0.96  # binomial sd of the coverage over 300 trials: 0.017


def test_verdict():
    assert verdict((-1.0, 2.0), (-3.0, 3.0)) == "held"
    assert verdict((4.0, 5.0), (-3.0, 3.0)) == "failed"
    assert verdict((-5.0, -4.0), (-3.0, 3.0)) == "failed"
    assert verdict((2.0, 4.0), (-3.0, 3.0)) == "undecided"
    assert verdict((-4.0, 4.0), (-3.0, 3.0)) == "undecided"


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


def test_run_options_enter_the_cache_key_only_when_set(tmp_path):
    cache = SystemCache(EvalConfig(cache=str(tmp_path)))
    plain = SystemSpec("a", "tiny")
    assert cache._path(SystemSpec("a", "tiny", dtype="float32", attention="auto", fp8_linears=False)) == cache._path(
        plain
    )
    fast = SystemSpec("a", "tiny", dtype="bfloat16", attention="int8_emulated", fp8_linears=True, bf16_blocks=[0])
    assert fast.bf16_blocks == (0,) and fast.run_changes() == {
        "dtype": "bfloat16",
        "attention": "int8_emulated",
        "fp8_linears": True,
        "bf16_blocks": (0,),
    }
    paths = {cache._path(s) for s in (plain, fast, SystemSpec("a", "tiny", dtype="bfloat16"))}
    assert len(paths) == 3
    with pytest.raises(ValueError, match="attention must be one of"):
        SystemSpec("a", "tiny", attention="int9")
    with pytest.raises(ValueError, match="dtype must be one of"):
        SystemSpec("a", "tiny", dtype="float8")
    with pytest.raises(ValueError, match="bf16_blocks"):  # blocks kept out of FP8 need FP8 linears
        EvalConfig(systems=(SystemSpec("a", "tiny", bf16_blocks=(1,)),))
    if not INTERPRETED:
        with pytest.raises(ValueError, match="needs CUDA"):
            EvalConfig(systems=(SystemSpec("a", "tiny", attention="triton_int8"),))
    with pytest.raises(ValueError, match="comparisons"):
        EvalConfig(systems=(plain,), comparisons=(("a", "b"),))


def test_pipeline_cache_applies_run_options():
    import torch

    from aptserve.engines.quant import quantized_layer_names
    from aptserve.evaluation.generate import PipelineCache

    pipelines = PipelineCache("cpu")
    fast = pipelines.get(SystemSpec("fast", "tiny", dtype="bfloat16", attention="int8_emulated", fp8_linears=True))
    assert fast.dtype == torch.bfloat16 and fast.dit.attention_impl == "int8_emulated"
    assert quantized_layer_names(fast.dit)
    plain = pipelines.get(SystemSpec("plain", "tiny"))
    assert plain is not fast and plain.dtype == torch.float32 and not quantized_layer_names(plain.dit)
    assert pipelines.get(SystemSpec("plain, 2 steps", "tiny", 2)) is plain  # same model and options: reused
    assert pipelines.get("tiny") is plain  # a model name: run as built (experiments/shape_confusion.py)
    blocks = pipelines.get(SystemSpec("too deep", "tiny", fp8_linears=True, bf16_blocks=(99,)))
    assert isinstance(blocks, str) and "bf16_blocks" in blocks  # a system that cannot run is skipped, with why


def test_run_eval_smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, docs/) land in the temporary folder
    cfg = EvalConfig(
        systems=(
            SystemSpec("random 1 step", "tiny", 1),
            SystemSpec("random 3 steps", "tiny", 3, guidance=1.0),  # scale 1: no unconditional pass to pay for
            SystemSpec("missing", "models/no-such-checkpoint", 1),
            SystemSpec(
                "random 1 step, fast path", "tiny", 1, dtype="bfloat16", attention="int8_emulated", fp8_linears=True
            ),
            SystemSpec("VAE round trip", "tiny", kind="vae"),
        ),
        comparisons=(("random 1 step", "random 1 step, fast path"), ("random 1 step", "missing")),
        claims=(
            ClaimSpec(
                "fast path no further from real",
                "random 1 step",
                "random 1 step, fast path",
                "frechet",
                "ratio_below",
                1.05,
            ),
            ClaimSpec("purer", "random 1 step", "random 3 steps", "purity", "difference_above", 0.0),
            ClaimSpec("needs a missing system", "random 1 step", "missing", "frechet", "ratio_below", 1.0),
        ),
        bootstrap=50,
        prompts=4,
        draws=2,
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
    assert set(report["systems"]) == {"random 1 step", "random 3 steps", "random 1 step, fast path", "VAE round trip"}
    assert set(report["intervals"]) == {"real", *report["systems"]}
    for spans in report["intervals"].values():
        assert set(spans) == {"colour", "shape", "motion", "all", "purity", "frechet"}
        assert all(low <= high for low, high in spans.values())
    for name, rates in report["rates"].items():  # Wilson intervals hold their estimate
        summary = report["real"] if name == "real" else report["systems"][name]
        assert summary["clips"] == 8 and rates["purity"][0] <= summary["purity"] <= rates["purity"][1]
    assert report["real"]["purity"] == 1.0  # rendered clips are one object on one background
    assert "| VAE round trip | — | — |" in text and "4 (seed 0) x 2 noise draws = 8 clips" in text
    decided, purer, missing_claim = report["claims"]
    assert decided["verdict"] in ("holds", "fails", "undecided") and decided["interval"][0] <= decided["interval"][1]
    assert purer["verdict"] in ("holds", "fails", "undecided") and "missing" in missing_claim
    assert "| fast path no further from real | random 1 step, fast path / random 1 step | frechet b / a = " in text
    fast, missing = report["comparisons"]
    assert fast["scores"]["frechet"]["verdict"] in ("held", "failed", "undecided") and "missing" in missing
    assert "**random 1 step, fast path** (b) against **random 1 step** (a):" in text
    assert "| frechet |" in text and "random 1 step, fast path: dtype bfloat16, attention int8_emulated" in text
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
    again = run_eval(dataclasses.replace(cfg, systems=cfg.systems[2:], comparisons=(), claims=()), progress=False)
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
        bootstrap=20,
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
    monkeypatch.setattr(
        PipelineCache, "get", lambda self, system: generated.append(system.model) or real_get(self, system)
    )
    again = json.loads(run_eval(cfg, progress=False).with_suffix(".json").read_text())
    assert generated == [] and again["systems"] == first["systems"]  # everything from the cache
    assert again["intervals"] == first["intervals"] and set(first["intervals"]) == {"real", "a 1 step", "preset"}
    for readings in (tmp_path / "runs" / "eval" / "systems").glob("*.npz"):
        readings.unlink()  # as results cached before per-clip readings were kept: still used, without intervals
    older = run_eval(cfg, progress=False)
    assert generated == [] and set(json.loads(older.with_suffix(".json").read_text())["intervals"]) == {"real"}
    row = next(line for line in older.read_text().splitlines() if line.startswith("| a 1 step |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # no bootstrap interval (the Frechet distance as cached); the binomial intervals need only the summary
    assert cells[11] == "—" and cells[10] != "—" and cells[7] != "—" and cells[9] != "—"
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
