"""APT on an open architecture: a tiny random Wan2.1 teacher round-trips through our checkpoint format, consistency
distillation and `train apt` accept it, the discriminator is a trainable copy of it with heads at fixed fractions of
its depth, and the exported one-step Wan generator loads and samples through the Pipeline. The diffusion stage
trains a Wan preset too."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch

from aptserve.engines.config import MODEL_PRESETS
from aptserve.engines.loading import load_checkpoint, random_model, save_checkpoint
from aptserve.engines.pipeline import Pipeline
from aptserve.engines.text import CachedTextEncoder
from aptserve.engines.wan import WAN_PRESETS, WanTransformer
from aptserve.training import stage_apt
from aptserve.training.discriminator import Discriminator, head_blocks
from aptserve.training.latents import LatentSet
from aptserve.training.stage_apt import APTStageConfig, d_step, make_parts, train_apt
from aptserve.training.stage_diffusion import DiffusionStageConfig, train_diffusion
from aptserve.training.stage_distill import DistillStageConfig, train_distill

WAN = dataclasses.replace(MODEL_PRESETS["wan-tiny"].dit, depth=4)  # 4 blocks: heads on 3 distinct ones
TEACHER = dataclasses.replace(MODEL_PRESETS["wan-tiny"], name="wan-teacher", dit=WAN, default_steps=8)
LATENT, TEXT_LEN = (16, 2, 4, 4), 6  # 2 latent frames of 4x4: 8 video tokens; prompts shorter than WAN.text_len


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra threads only add sync overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_latents(text_len: int = TEXT_LEN, n: int = 6) -> LatentSet:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, text_len, dtype=torch.bool)
    mask[0, 2:] = False  # the empty prompt: start and end tokens
    mask[1, 4:] = False
    return LatentSet(
        latents=torch.randn(n, *LATENT, generator=g).half(),
        caption_ids=torch.arange(n) % 2 + 1,
        captions=["", "a red circle moving left", "a blue square moving up"],
        text_tokens=torch.randn(3, text_len, WAN.text_dim, generator=g).half(),
        text_mask=mask,
        latent_mean=0.0,
        latent_std=1.0,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder holding the Wan teacher checkpoint and the latent set."""
    folder = tmp_path_factory.mktemp("wan")
    model = random_model(TEACHER, seed=0)
    save_checkpoint(folder / "teacher", TEACHER, {"dit": model.dit, "vae": model.vae})
    tiny_latents().save(folder / "latents.pt")
    return folder


@pytest.fixture(scope="module")
def teacher(work) -> WanTransformer:
    return load_checkpoint(work / "teacher").dit


@pytest.fixture(scope="module")
def student(work):
    """The teacher consistency-distilled for a few steps: the generator APT starts from."""
    cfg = DistillStageConfig(
        out=str(work / "cd-run"),
        export=str(work / "student"),
        teacher=str(work / "teacher"),
        latents=str(work / "latents.pt"),
        steps=2,
        batch_size=2,
        lr=1e-3,
        guidance_scale=3.0,
        num_timesteps=4,
        export_dtype="float32",
        log_every=1,
    )
    return train_distill(cfg, progress=False)


def read_rows(folder) -> list[dict[str, str]]:
    with open(folder / "losses.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_wan_teacher_round_trips_through_our_checkpoint_format(work):
    original = random_model(TEACHER, seed=0).dit.state_dict()
    loaded = load_checkpoint(work / "teacher")
    assert loaded.config.arch == "wan2.1" and loaded.config.dit == WAN
    assert isinstance(loaded.dit, WanTransformer) and len(loaded.dit.blocks) == 4
    state = loaded.dit.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_consistency_distillation_accepts_a_wan_teacher(work, teacher, student):
    assert [r["step"] for r in read_rows(work / "cd-run")] == ["1", "2"]
    assert all(math.isfinite(float(r["loss"])) for r in read_rows(work / "cd-run"))
    loaded = load_checkpoint(student)
    assert loaded.config.arch == "wan2.1" and loaded.config.dit == WAN and loaded.config.default_steps == 1
    assert isinstance(loaded.dit, WanTransformer)
    moved = [k for k, v in teacher.state_dict().items() if not torch.equal(loaded.dit.state_dict()[k], v)]
    assert moved  # the student started from the teacher and trained


def test_discriminator_heads_read_wan_blocks_at_the_depth_fractions(teacher):
    torch.manual_seed(0)
    disc = Discriminator(teacher)
    assert disc.blocks_read == head_blocks(4) == (1, 2, 3) and len(disc.heads) == 3
    assert isinstance(disc.backbone, WanTransformer) and disc.backbone is not teacher
    block_out, head_in = {}, []
    for i, block in enumerate(disc.backbone.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: block_out.__setitem__(i, out))
    for head in disc.heads:
        head.register_forward_hook(lambda m, args, out: head_in.append(args[0]))
    x, text, mask = tiny_latents().batch(torch.arange(2))
    logits = disc(x, torch.rand(2), text, mask)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert [id(f) for f in head_in] == [id(block_out[i]) for i in (1, 2, 3)]
    assert not any(head_in[0] is block_out[i] for i in (0, 2, 3))


def test_wan_discriminator_is_the_teacher_without_its_output_layer_and_all_of_it_trains(teacher, tmp_path):
    cfg = APTStageConfig(out=str(tmp_path / "run"), export=str(tmp_path / "apt"), batch_size=2, lr_d=1e-3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    parts = make_parts(teacher, WanTransformer(WAN), cfg)
    backbone = parts.disc.backbone.state_dict()
    assert set(before) - set(backbone) == {"final_table", "final_proj.weight", "final_proj.bias"}
    assert all(torch.equal(backbone[k], before[k]) for k in backbone)
    d_step(parts, tiny_latents(), cfg)
    idle = [n for n, p in parts.disc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert idle == []
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())  # the teacher is untouched
    trained = parts.disc.backbone.blocks[0].self_attn.qkv.weight
    assert not torch.equal(trained, before["blocks.0.self_attn.qkv.weight"])


def test_train_apt_on_wan_exports_a_one_step_wan_generator(work, teacher, student, minilm, tmp_path, monkeypatch):
    made = []
    real_make_parts = stage_apt.make_parts

    def recording(*args):
        parts = real_make_parts(*args)
        made.append((parts, {k: v.clone() for k, v in parts.disc.backbone.state_dict().items()}))
        return parts

    monkeypatch.setattr(stage_apt, "make_parts", recording)
    cfg = APTStageConfig(
        out=str(tmp_path / "run"),
        export=str(tmp_path / "apt"),
        teacher=str(work / "teacher"),
        generator=str(student),
        latents=str(work / "latents.pt"),
        steps=3,
        batch_size=2,
        lr_g=1e-3,
        lr_d=1e-3,
        ema_decay=0.5,
        log_every=1,
    )
    assert train_apt(cfg, progress=False) == tmp_path / "apt"
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    for key in ("d_loss", "g_loss", "r1", "d_real", "d_fake"):
        assert all(math.isfinite(float(r[key])) for r in rows), key

    ((parts, disc_at_start),) = made
    assert isinstance(parts.disc.backbone, WanTransformer)
    assert set(teacher.state_dict()) - set(disc_at_start) == {"final_table", "final_proj.weight", "final_proj.bias"}
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in disc_at_start.items())
    start = load_checkpoint(student).dit.state_dict()
    assert any(not torch.equal(p.detach(), start[n]) for n, p in parts.generator.named_parameters())

    loaded = load_checkpoint(tmp_path / "apt")
    assert loaded.config.arch == "wan2.1" and loaded.config.dit == WAN and loaded.config.default_steps == 1
    assert isinstance(loaded.dit, WanTransformer)
    for name, value in loaded.dit.state_dict().items():  # the EMA, stored as float16
        torch.testing.assert_close(value, parts.ema.shadow[name].half().float(), rtol=0, atol=0)
    assert any(not torch.equal(v, start[k].half().float()) for k, v in loaded.dit.state_dict().items())  # EMA moved
    pipeline = Pipeline(loaded, CachedTextEncoder(minilm))
    request = pipeline.request("a red circle moving left", 0, "32x32", 0.2)
    with torch.inference_mode():
        latent = pipeline.denoise(request, *pipeline.encode_text(request.prompts))
    assert latent.shape == (1, *pipeline.latent_shape(request)) and torch.isfinite(latent).all()
    video, _ = pipeline.generate_video(request)
    assert video.shape == (1, request.frames, 32, 32, 3)


def test_train_apt_refuses_prompts_longer_than_the_wan_text_length(work, student, tmp_path):
    tiny_latents(text_len=WAN.text_len + 1).save(tmp_path / "long.pt")
    cfg = APTStageConfig(
        out=str(tmp_path / "run"),
        export=str(tmp_path / "apt"),
        teacher=str(work / "teacher"),
        generator=str(student),
        latents=str(tmp_path / "long.pt"),
        steps=1,
        batch_size=2,
    )
    with pytest.raises(ValueError, match=f"33 x 384.*at most {WAN.text_len} tokens"):
        train_apt(cfg, progress=False)
    assert not (tmp_path / "apt").exists()


def test_diffusion_stage_trains_a_wan_preset_sized_to_the_text_encoder(work, tmp_path):
    save_checkpoint(tmp_path / "vae", TEACHER, {"vae": random_model(TEACHER, seed=0).vae})
    cfg = DiffusionStageConfig(
        out=str(tmp_path / "run"),
        export=str(tmp_path / "teacher"),
        vae=str(tmp_path / "vae"),
        latents=str(work / "latents.pt"),  # exists: nothing is encoded
        dit="wan-tiny",
        steps=2,
        batch_size=2,
        warmup=1,
        log_every=1,
        width=32,
        height=32,
    )
    train_diffusion(cfg, progress=False)
    assert all(math.isfinite(float(r["loss"])) for r in read_rows(tmp_path / "run"))
    loaded = load_checkpoint(tmp_path / "teacher")
    assert loaded.config.arch == "wan2.1" and isinstance(loaded.dit, WanTransformer)
    assert loaded.config.dit == dataclasses.replace(WAN_PRESETS["wan-tiny"], text_dim=384, text_len=32)
    with pytest.raises(ValueError, match="unknown generator preset 'wan-huge'"):
        train_diffusion(dataclasses.replace(cfg, dit="wan-huge"), progress=False)


def test_train_apt_refuses_a_generator_of_another_architecture(work, tmp_path):
    """An MMDiT generator on the same latents and text cannot be trained against a Wan teacher's discriminator."""
    mmdit = random_model(MODEL_PRESETS["tiny"], seed=0)
    save_checkpoint(tmp_path / "mmdit", MODEL_PRESETS["tiny"], {"dit": mmdit.dit})
    cfg = APTStageConfig(
        out=str(tmp_path / "run"),
        export=str(tmp_path / "apt"),
        teacher=str(work / "teacher"),
        generator=str(tmp_path / "mmdit"),
        latents=str(work / "latents.pt"),
        steps=1,
        batch_size=2,
    )
    with pytest.raises(ValueError, match=r"is a mmdit generator but .* a wan2\.1 teacher"):
        train_apt(cfg, progress=False)
