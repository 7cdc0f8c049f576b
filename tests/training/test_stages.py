"""Smoke runs of the training stages at toy sizes, resume, and the CLI surviving a kill."""

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aptserve.engines.config import MODEL_PRESETS
from aptserve.engines.dit import MMDiT
from aptserve.engines.loading import load_checkpoint, load_components, save_checkpoint, storage_dtype
from aptserve.engines.pipeline import Pipeline
from aptserve.engines.text import CachedTextEncoder
from aptserve.engines.vae import CausalVAE
from aptserve.training.common import EMA, autocast, compute_dtype, load_stage_config
from aptserve.training.data import (
    ShapesDataset,
    ShapeSpec,
    all_combinations,
    caption_grammar,
    caption_of,
    held_out_combinations,
    is_held_out,
    named_attributes,
    shapes_sample,
    shorter_captions,
)
from aptserve.training.latents import LatentSet
from aptserve.training.stage_diffusion import DiffusionStageConfig, load_init, train_diffusion
from aptserve.training.stage_distill import DistillStageConfig, train_distill
from aptserve.training.stage_vae import VAEStageConfig, train_vae

TOY = {"frames": 5, "height": 32, "width": 32}


def rows(path: Path) -> list[dict]:
    with open(path / "losses.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_shapes_data_is_deterministic_by_seed_and_splits_held_out():
    a, spec_a = shapes_sample(3, 7)
    b, spec_b = shapes_sample(3, 7)
    c, _ = shapes_sample(4, 7)
    assert spec_a == spec_b and (a == b).all() and not (a == c).all()
    assert a.shape == (49, 64, 64, 3) and a.dtype.name == "uint8"
    video, _ = next(iter(ShapesDataset(seed=1, **TOY)))
    assert video.shape == (3, 5, 32, 32) and video.min() >= -1 and video.max() <= 1
    assert not is_held_out(shapes_sample(0, 1)[1].combination)
    assert is_held_out(shapes_sample(0, 1, held_out=True)[1].combination)
    assert len(held_out_combinations()) >= 256
    stream = iter(ShapesDataset(seed=2, start=5, **TOY))
    assert next(stream)[1] == shapes_sample(2, 5, **TOY)[1].caption  # a resumed stream continues in place


def test_shorter_captions_leave_out_the_optional_attributes():
    spec = ShapeSpec("red", "circle", "left", "black", "large", "slowly")
    assert spec.caption == "a large red circle moving left slowly on a black background"
    shorter = shorter_captions(spec.caption)
    assert len(set(shorter)) == 7 and spec.caption not in shorter
    assert {"a red circle moving left", "a large red circle moving left slowly", "a red circle moving left on a black background"} <= set(shorter)  # fmt: skip
    kept = {"colour": "red", "shape": "circle", "motion": "left"}
    assert all(named_attributes(s).items() >= kept.items() for s in shorter)
    growing = ShapeSpec("blue", "star", "growing", "white", "small", "quickly")
    assert "a blue star growing quickly" in shorter_captions(growing.caption)
    assert shorter_captions("a red circle moving left") == []
    assert shorter_captions("a red circle moving left slowly") == ["a red circle moving left"]
    with pytest.raises(ValueError, match="not a shapes caption"):
        shorter_captions("a cat on a mat")


def test_caption_grammar_parses_every_caption_and_completes_short_ones():
    grammar = caption_grammar()
    for colour, shape, motion, background, size, speed in all_combinations():
        spec = ShapeSpec(colour, shape, motion, background, size, speed)
        assert grammar.parse(spec.caption) == named_attributes(spec.caption) == {
            "colour": colour, "shape": shape, "motion": motion, "background": background, "size": size, "speed": speed,
        }  # fmt: skip
        assert grammar.complete(spec.caption, seed=1) == spec.caption
    completed = {grammar.complete("a red circle moving left", seed) for seed in range(200)}
    assert len(completed) == 12  # every size x speed x background
    assert all(text in completed for text in (caption_of("red", "circle", "left", sz, sp, bg) for sz, sp, bg in [
        ("small", "slowly", "black"), ("large", "quickly", "white"),
    ]))  # fmt: skip
    assert grammar.complete("a red cat moving left", seed=1) == "a red cat moving left"


def test_ema_update_math():
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema = EMA(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(3.0)
    ema.update(module)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))


def test_stage_config_rejects_unknown_keys(tmp_path):
    (tmp_path / "c.json").write_text('{"steps": 3, "stepz": 4}')
    with pytest.raises(ValueError, match="stepz"):
        load_stage_config(VAEStageConfig, tmp_path / "c.json")


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_committed_config_loads_into_its_stage(path):
    """A typo in a config fails here, not after a long-running stage has encoded its latents."""
    from aptserve.evaluation.config import EvalConfig
    from aptserve.training import STAGES, stage

    name = path.name.split("_")[0]
    assert name in (*STAGES, "eval"), f"{path.name}: name configs <stage>_<...>.json"
    if name == "eval":
        cfg = load_stage_config(EvalConfig, path)
        assert cfg.systems
        return
    cfg = load_stage_config(stage(name)[0], path)
    if hasattr(cfg, "compute_dtype"):
        compute_dtype(cfg.compute_dtype)
    if hasattr(cfg, "export_dtype"):
        storage_dtype(cfg.export_dtype)


def test_autocast_is_bfloat16_mixed_precision_or_a_no_op():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with autocast("bfloat16"):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32  # weights stay float32
    torch.testing.assert_close(y.float(), layer(x), atol=3e-2, rtol=3e-2)
    with autocast("float32"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype"):
        autocast("float8")


def test_diffusion_stage_rejects_a_bad_compute_dtype_before_encoding(tmp_path):
    cfg = DiffusionStageConfig(out=str(tmp_path / "t"), latents=str(tmp_path / "l.pt"), compute_dtype="half")
    with pytest.raises(ValueError, match="compute_dtype"):
        train_diffusion(cfg, progress=False)
    assert not (tmp_path / "l.pt").exists()


def test_vae_diffusion_distill_chain_runs_and_resumes(tmp_path):
    vae_cfg = VAEStageConfig(
        out=str(tmp_path / "vae"),
        export=str(tmp_path / "vae-ckpt"),
        steps=2,
        batch_size=2,
        crop=16,
        stats_clips=2,
        log_every=1,
        **TOY,
    )
    train_vae(vae_cfg, progress=False)
    config, _ = load_components(tmp_path / "vae-ckpt", ("vae",))
    assert config.vae.latent_std > 0 and len(rows(tmp_path / "vae")) == 2
    more = dataclasses.replace(
        vae_cfg,
        out=str(tmp_path / "vae2"),
        export=str(tmp_path / "vae2-ckpt"),
        steps=1,
        init=str(tmp_path / "vae-ckpt"),
    )
    train_vae(more, progress=False)  # continues from the exported VAE
    assert load_components(tmp_path / "vae2-ckpt", ("vae",))[0].vae.latent_std > 0

    common = {"latents": str(tmp_path / "latents.pt"), "log_every": 1, "checkpoint_every": 1}
    diffusion = DiffusionStageConfig(
        out=str(tmp_path / "teacher"),
        export=str(tmp_path / "teacher-ckpt"),
        vae=str(tmp_path / "vae-ckpt"),
        latent_clips=4,
        batch_size=2,
        steps=2,
        compute_dtype="bfloat16",  # mixed precision: latent encoding and the training forward passes
        latent_norm="channel",
        **common,
        **TOY,
    )
    train_diffusion(dataclasses.replace(diffusion, steps=1), progress=False)  # stops early: state saved
    train_diffusion(diffusion, progress=False)  # resumes at step 1
    assert [int(r["step"]) for r in rows(tmp_path / "teacher")] == [1, 2]
    teacher = load_checkpoint(tmp_path / "teacher-ckpt")
    assert teacher.config.default_steps == 25
    assert teacher.config.prompt_grammar == caption_grammar().to_dict()  # serving completes short prompts by it
    # trained on per-channel normalised latents; the statistics travel with the checkpoint's VAE
    latents = LatentSet.load(tmp_path / "latents.pt")
    assert latents.latent_std == config.vae.latent_std  # encoded in the VAE's own normalisation
    assert teacher.config.vae.normalisation == latents.raw_statistics()
    assert len(teacher.config.vae.latent_std) == teacher.config.vae.latent_channels
    # more training for an exported teacher: its weights start the model, in the same latent space only
    more_teacher = dataclasses.replace(
        diffusion, out=str(tmp_path / "teacher2"), export=str(tmp_path / "teacher2-ckpt"), steps=1,
        init=str(tmp_path / "teacher-ckpt"),
    )  # fmt: skip
    train_diffusion(more_teacher, progress=False)
    assert load_checkpoint(tmp_path / "teacher2-ckpt").config.vae == teacher.config.vae
    started = MMDiT(teacher.config.dit)
    load_init(started, str(tmp_path / "teacher-ckpt"), teacher.config.vae)
    for name, p in teacher.dit.state_dict().items():
        torch.testing.assert_close(started.state_dict()[name], p.float())
    with pytest.raises(ValueError, match="latent normalisation"):
        train_diffusion(dataclasses.replace(more_teacher, out=str(tmp_path / "t3"), latent_norm="vae"), progress=False)
    # ... or moved on purpose into another one: here the first latent frame normalised apart
    moved = dataclasses.replace(
        more_teacher, out=str(tmp_path / "t4"), export=str(tmp_path / "t4-ckpt"), latent_norm="frames",
        latent_first_frames=1, init_other_normalisation=True, shorter_captions=0.5,
    )  # fmt: skip
    train_diffusion(moved, progress=False)
    with_shorter = LatentSet.load(tmp_path / "latents.pt")  # the shorter captions were encoded once and saved
    assert with_shorter.shorter_ids is not None and len(with_shorter.captions) > len(latents.captions)
    moved_vae = load_checkpoint(tmp_path / "t4-ckpt").config.vae  # through the checkpoint's JSON
    assert moved_vae.normalisation == latents.raw_statistics(first_frames=1) != teacher.config.vae.normalisation
    assert len(moved_vae.first_frames_std) == 1 and len(moved_vae.first_frames_std[0]) == moved_vae.latent_channels

    distill = DistillStageConfig(
        out=str(tmp_path / "cd"),
        export=str(tmp_path / "cd-ckpt"),
        teacher=str(tmp_path / "teacher-ckpt"),
        steps=2,
        batch_size=2,
        num_timesteps=4,
        ema_decay=0.5,
        shorter_captions=0.5,
        **common,
    )
    train_distill(distill, progress=False)
    student = load_checkpoint(tmp_path / "cd-ckpt")
    assert student.config.default_steps == 1 and student.config.guidance_scale == 1.0
    assert student.config.vae == teacher.config.vae
    assert student.config.prompt_grammar == teacher.config.prompt_grammar
    state = torch.load(tmp_path / "cd" / "state.pt", weights_only=False)["stage"]
    assert state["ema"]["updates"] == 2
    for name, p in student.dit.named_parameters():  # the export is the EMA (float16 on disk), not the last weights
        torch.testing.assert_close(p.float(), state["ema"]["shadow"][name].half().float())
    assert any(not torch.equal(state["ema"]["shadow"][n], state["student"][n]) for n in state["student"])


def test_exported_student_generates(tmp_path, minilm):
    config = dataclasses.replace(MODEL_PRESETS["tiny"], name="toy")
    vae = CausalVAE(config.vae)
    vae.init_weights()
    from aptserve.engines.dit import MMDiT

    dit = MMDiT(config.dit)
    dit.init_weights()
    save_checkpoint(tmp_path / "toy", config, {"dit": dit, "vae": vae})
    pipeline = Pipeline(load_checkpoint(tmp_path / "toy"), CachedTextEncoder(minilm))
    video, _ = pipeline.generate_video(pipeline.request("a red circle", 0, "32x32", 0.2))
    assert video.shape == (1, 5, 32, 32, 3)


def test_cli_resumes_after_being_killed(tmp_path):
    config = tmp_path / "vae.json"
    config.write_text(
        '{"steps": 400, "batch_size": 1, "frames": 5, "height": 32, "width": 32, "crop": 16, "stats_clips": 1,'
        ' "checkpoint_every": 3, "log_every": 3}'
    )
    out, exe = tmp_path / "run", Path(sys.executable).parent / "aptserve"
    cmd = [str(exe), "train", "vae", "--config", str(config), "--out", str(out), "--export", str(tmp_path / "ckpt")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "state.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to save: the last periodic checkpoint must do
    _, stderr = proc.communicate()
    assert "train vae" in stderr  # the progress bar
    saved = torch.load(out / "state.pt", weights_only=False)["step"]
    assert saved >= 3 and saved < 400
    result = subprocess.run(
        [*cmd, "--steps", str(saved + 3), "--no-progress"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"resumed {out} at step {saved}" in result.stderr
    assert [int(r["step"]) for r in rows(out)][-1] == saved + 3
    assert (tmp_path / "ckpt" / "config.json").exists()


def test_ema_warmup_forgets_the_initialisation():
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.999, warmup=True)
    decays = []
    with torch.no_grad():
        module.weight.fill_(1.0)
    for _ in range(2000):
        decays.append(ema.current_decay())
        ema.update(module)
    assert (
        decays[0] == pytest.approx(0.1)
        and decays[90] == pytest.approx(91 / 100)
        and decays[-1] == pytest.approx(2000 / 2009)
    )
    init_share = float(np.prod(decays))  # what is left of the initial weights
    assert init_share < 1e-6 and ema.shadow["weight"].sub(1.0).abs().max() < 1e-6
    plain = EMA(module, decay=0.999)
    assert plain.current_decay() == 0.999
    state = ema.state_dict()
    assert state["updates"] == 2000 and state["warmup"] is True
    legacy = {k: v for k, v in state.items() if k not in ("updates", "warmup")}  # saved before the count existed
    restored = EMA(module, decay=0.999, warmup=True)
    restored.load_state_dict(legacy)
    assert restored.updates == 0 and restored.current_decay() == pytest.approx(0.1)  # the warm-up restarts
