"""Adversarial post-training: generator at t = 1 only, discriminator heads and gradients, approximated R1, EMA, and a
resumable smoke run of the whole stage."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from aptserve.engines.config import MODEL_PRESETS
from aptserve.engines.dit import DiTConfig, MMDiT
from aptserve.engines.loading import load_checkpoint, random_model, save_checkpoint
from aptserve.engines.text import TextEncoderConfig
from aptserve.training import stage_apt
from aptserve.training.discriminator import approx_r1, head_blocks, sample_d_timesteps
from aptserve.training.latents import LatentSet
from aptserve.training.stage_apt import (
    APTStageConfig,
    d_losses,
    d_step,
    g_step,
    make_parts,
    sample_batch,
    set_learning_rates,
    train_apt,
)

TEXT_DIM, TEXT_LEN, LATENT = 8, 4, (16, 5, 4, 4)
DIT = DiTConfig(depth=6, hidden_size=64, num_heads=4, text_dim=TEXT_DIM, freq_dim=32)


def tiny_dit(seed: int) -> MMDiT:
    dit = MMDiT(DIT)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_out=False)
    return dit


def tiny_latents(n: int = 6) -> LatentSet:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, TEXT_LEN, dtype=torch.bool)
    mask[0, 1:] = False  # the empty prompt
    mask[1, 3:] = False
    return LatentSet(
        latents=torch.randn(n, *LATENT, generator=g).half(),
        caption_ids=torch.arange(n) % 2 + 1,
        captions=["", "a red circle moving left", "a blue square moving up"],
        text_tokens=torch.randn(3, TEXT_LEN, TEXT_DIM, generator=g).half(),
        text_mask=mask,
        latent_mean=0.0,
        latent_std=1.0,
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra threads only add sync overhead, which is 10x on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg(tmp_path) -> APTStageConfig:
    return APTStageConfig(
        out=str(tmp_path / "run"), export=str(tmp_path / "export"), batch_size=2, lr_g=1e-3, lr_d=1e-3
    )


@pytest.fixture
def teacher() -> MMDiT:
    return tiny_dit(1)


@pytest.fixture
def parts(teacher, cfg):
    torch.manual_seed(0)
    return make_parts(teacher, tiny_dit(2), cfg)


def real_batch(data: LatentSet, n: int = 2):
    return data.batch(torch.arange(n))


def test_batches_draw_shorter_captions_when_asked(cfg):
    data = dataclasses.replace(tiny_latents(), shorter_ids=torch.tensor([[0], [2], [2]]))  # row 1's shorter: row 2
    _, text, mask = sample_batch(data, dataclasses.replace(cfg, batch_size=4, shorter_captions=1.0))
    assert torch.equal(text, data.text_tokens[[2] * 4].float()) and torch.equal(mask, data.text_mask[[2] * 4])


def test_head_blocks_scale_16_26_36_of_36():
    assert head_blocks(36) == (15, 25, 35)
    assert head_blocks(6) == (2, 3, 5)
    assert head_blocks(3) == (0, 1, 2)
    with pytest.raises(ValueError, match="too small"):
        head_blocks(2)


def test_heads_read_the_outputs_of_exactly_the_configured_blocks(parts):
    disc = parts.disc
    assert disc.blocks_read == (2, 3, 5) and len(disc.heads) == 3
    block_out, head_in = {}, []
    for i, block in enumerate(disc.backbone.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: block_out.__setitem__(i, out[0]))
    for head in disc.heads:
        head.register_forward_hook(lambda m, args, out: head_in.append(args[0]))
    x, text, mask = real_batch(tiny_latents())
    disc(x, torch.rand(2), text, mask)
    assert len(head_in) == 3
    for features, index in zip(head_in, (2, 3, 5)):
        assert features is block_out[index]
    assert not any(head_in[0] is block_out[i] for i in (0, 1, 4))


def test_generator_is_queried_only_at_t_equal_one(parts, cfg):
    seen = []
    forward = parts.generator.forward

    def recording(x, t, *args, **kwargs):
        seen.append(t.detach().clone())
        return forward(x, t, *args, **kwargs)

    parts.generator.forward = recording
    d_step(parts, tiny_latents(), cfg)
    g_step(parts, tiny_latents(), cfg)
    assert len(seen) == 2
    assert all(torch.equal(t, torch.ones(cfg.batch_size)) for t in seen)


@pytest.mark.parametrize("sigma_is_variance", [False, True])
def test_approximated_r1_equals_its_formula_for_a_fixed_eps(parts, cfg, sigma_is_variance):
    cfg = dataclasses.replace(cfg, r1_sigma=0.04, sigma_is_variance=sigma_is_variance)
    std = 0.2 if sigma_is_variance else 0.04
    x, text, mask = real_batch(tiny_latents())
    fake, eps, t = torch.randn_like(x), torch.randn_like(x), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        losses = d_losses(parts.disc, x, fake, text, mask, t, eps, None, cfg)
        by_hand = cfg.r1_lambda * (parts.disc(x, t, text, mask) - parts.disc(x + std * eps, t, text, mask)).pow(2)
    torch.testing.assert_close(losses["r1"], by_hand.mean(), rtol=1e-4, atol=1e-6)
    assert losses["r1"] > 0
    assert approx_r1(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0]), 100.0).item() == pytest.approx(12.5)


def test_one_d_step_gives_every_discriminator_parameter_a_gradient(parts, cfg):
    names = [name for name, _ in parts.disc.named_parameters()]
    assert not any("final_" in name for name in names)  # the teacher's output layer is not part of D
    d_step(parts, tiny_latents(), cfg)
    missing = [n for n, p in parts.disc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_discriminator_is_a_trainable_copy_of_the_teacher(teacher, parts, cfg):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    backbone = parts.disc.backbone.state_dict()
    shared = [k for k in before if not k.startswith(("final_mod", "final_proj"))]
    assert all(torch.equal(backbone[k], before[k]) for k in shared)
    assert all(p.requires_grad for p in parts.disc.parameters())
    d_step(parts, tiny_latents(), cfg)
    assert all(torch.equal(teacher.state_dict()[k], before[k]) for k in before)
    assert not torch.equal(parts.disc.backbone.blocks[0].video_out.weight, before["blocks.0.video_out.weight"])


def test_g_step_updates_the_ema(parts, cfg):
    shadow = {k: v.clone() for k, v in parts.ema.shadow.items()}
    g_step(parts, tiny_latents(), cfg)
    decay = cfg.ema_decay
    for name, p in parts.generator.named_parameters():
        torch.testing.assert_close(parts.ema.shadow[name], decay * shadow[name] + (1 - decay) * p.detach())
    assert any(not torch.equal(parts.ema.shadow[k], shadow[k]) for k in shadow)


def test_accumulated_d_gradient_is_the_gradient_of_the_whole_batch(teacher, cfg, monkeypatch):
    """Two micro-batches of 2 give D the same gradient as one batch of 4 made of them (aR1 on)."""
    cfg = dataclasses.replace(cfg, accumulate=2)
    seen = []
    real_d_losses = stage_apt.d_losses
    monkeypatch.setattr(stage_apt, "d_losses", lambda *a: seen.append(a[1:7]) or real_d_losses(*a))
    torch.manual_seed(0)
    accumulated = make_parts(teacher, tiny_dit(2), cfg)
    logged = d_step(accumulated, tiny_latents(), cfg)
    assert len(seen) == 2
    torch.manual_seed(0)
    whole = make_parts(teacher, tiny_dit(2), cfg)
    inputs = [torch.cat(parts_of) for parts_of in zip(*seen)]
    losses = real_d_losses(whole.disc, *inputs, None, dataclasses.replace(cfg, batch_size=4))
    losses["total"].backward()
    for (name, a), (_, b) in zip(accumulated.disc.named_parameters(), whole.disc.named_parameters(), strict=True):
        torch.testing.assert_close(
            a.grad, b.grad, rtol=1e-3, atol=1e-4 * b.grad.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}"
        )
    assert logged["r1"] == pytest.approx(losses["r1"].item(), rel=1e-4)  # logged values are micro-batch means


def test_accumulated_g_step_runs_every_micro_batch_then_one_update(parts, cfg, monkeypatch):
    cfg = dataclasses.replace(cfg, accumulate=3)
    calls = []
    real_micro = stage_apt.g_micro_step
    monkeypatch.setattr(stage_apt, "g_micro_step", lambda *a: calls.append(1) or real_micro(*a))
    steps = parts.opt_g.state_dict()["state"]
    g_step(parts, tiny_latents(), cfg)
    assert len(calls) == 3 and not steps
    assert all(s["step"] == 1 for s in parts.opt_g.state_dict()["state"].values())  # one optimiser update


def test_d_timesteps_are_shifted_uniform():
    t = sample_d_timesteps(1000, 12.0, torch.Generator().manual_seed(0))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, 12 * u / (1 + 11 * u))
    assert t.median() > 0.8  # s = 12 keeps D's timesteps mostly near the noisy end


def test_relativistic_loss_reports_r2_and_steps(parts, cfg):
    cfg = dataclasses.replace(cfg, loss="relativistic")
    losses = {**d_step(parts, tiny_latents(), cfg), **g_step(parts, tiny_latents(), cfg)}
    assert {"d_loss", "r1", "r2", "d_real", "d_fake", "g_loss"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="loss"):
        APTStageConfig(loss="hinge")
    with pytest.raises(ValueError, match="optimizer"):
        APTStageConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="lr_schedule"):
        APTStageConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="mismatch_differ"):
        APTStageConfig(mismatch_differ=("size",))
    with pytest.raises(ValueError, match="mismatch_differ"):
        APTStageConfig(mismatch_differ=())
    with pytest.raises(ValueError, match='needs mismatch_captions "swapped"'):
        APTStageConfig(mismatch_pairs=(("circle", "square"),))
    for bad in [("circle", "red"), ("circle", "circle"), ("circle",), ("circle", "square", "star")]:
        with pytest.raises(ValueError, match="mismatch_pairs: a swap pair must name two values"):
            APTStageConfig(mismatch_captions="swapped", mismatch_pairs=(bad,))
    with pytest.raises(ValueError, match="mismatch_pairs: a value may be in one swap pair only"):
        APTStageConfig(mismatch_captions="swapped", mismatch_pairs=(("circle", "square"), ("star", "circle")))
    as_json = APTStageConfig(mismatch_captions="swapped", mismatch_pairs=(["circle", "square"],))
    assert as_json.mismatch_pairs == (("circle", "square"),)
    with pytest.raises(ValueError, match="lr_branch"):
        APTStageConfig(matching_branch=True, lr_branch=0.0)
    with pytest.raises(ValueError, match="branch_warmup needs matching_branch and swapped negatives"):
        APTStageConfig(branch_warmup=10, mismatch_weight=0.5, mismatch_captions="swapped")
    with pytest.raises(ValueError, match="branch_warmup needs matching_branch and swapped negatives"):
        APTStageConfig(branch_warmup=10, matching_branch=True)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_learning_rates_follow_the_schedule_by_step(parts, cfg, schedule):
    cfg = dataclasses.replace(cfg, steps=4, lr_g=1e-5, lr_d=5e-5, lr_schedule=schedule)
    expected = {"constant": [1.0, 1.0, 1.0, 1.0], "linear": [1.0, 0.75, 0.5, 0.25]}[schedule]
    for step in (2, 0, 3, 1):  # a function of the step alone: a resumed run picks up where it stopped
        set_learning_rates(parts, step, cfg)
        assert [g["lr"] for g in parts.opt_g.param_groups] == [pytest.approx(1e-5 * expected[step])]
        assert [g["lr"] for g in parts.opt_d.param_groups] == [pytest.approx(5e-5 * expected[step])]


def read_steps(path) -> list[dict[str, str]]:
    with open(path / "losses.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_stage_smoke_run_exports_and_resumes(tmp_path, monkeypatch):
    base = MODEL_PRESETS["tiny"]
    config = dataclasses.replace(base, name="teacher", dit=DIT, text=TextEncoderConfig(dim=TEXT_DIM), default_steps=25)
    model = random_model(config, seed=0)
    save_checkpoint(tmp_path / "teacher", config, {"dit": model.dit, "vae": model.vae})
    save_checkpoint(tmp_path / "student", config, {"dit": tiny_dit(2)})
    tiny_latents().save(tmp_path / "latents.pt")
    cfg = APTStageConfig(
        out=str(tmp_path / "run"),
        export=str(tmp_path / "apt"),
        teacher=str(tmp_path / "teacher"),
        generator=str(tmp_path / "student"),
        latents=str(tmp_path / "latents.pt"),
        steps=3,
        batch_size=2,
        lr_g=1e-4,
        lr_d=1e-4,
        log_every=1,
        checkpoint_every=2,
    )
    assert train_apt(cfg, progress=False) == tmp_path / "apt"
    rows = read_steps(tmp_path / "run")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert {"d_loss", "g_loss", "r1", "d_real", "d_fake"} <= set(rows[0])
    loaded = load_checkpoint(tmp_path / "apt")
    assert loaded.config.default_steps == 1 and loaded.config.dit == DIT

    calls = []
    monkeypatch.setattr(stage_apt, "d_step", lambda *a: calls.append(1) or d_step(*a))
    train_apt(dataclasses.replace(cfg, steps=5), progress=False)
    assert len(calls) == 2  # resumed at step 3: only steps 4 and 5 ran
    assert [r["step"] for r in read_steps(tmp_path / "run")] == ["1", "2", "3", "4", "5"]
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == 5


def test_mismatched_captions_contradict_their_clips():
    """A matching-aware D's negatives: every borrowed caption names another colour, shape or motion than the clip's
    own caption, also after shortening (the short forms keep those three)."""
    captions = ["", "a red circle moving left", "a red circle moving left slowly", "a blue circle moving left"]
    captions += ["a red square moving up", "a red circle moving right", "a red square moving left"]
    captions += ["a blue triangle moving left"]
    data = dataclasses.replace(
        tiny_latents(12),
        caption_ids=torch.tensor([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5]),
        captions=captions,
        text_tokens=torch.randn(len(captions), TEXT_LEN, TEXT_DIM).half(),
        text_mask=torch.ones(len(captions), TEXT_LEN, dtype=torch.bool),
    )
    slots = data.caption_slots()
    assert slots[0].tolist() == [-1, -1, -1] and torch.equal(slots[1], slots[2])  # "slowly" is no contradiction
    torch.manual_seed(0)
    for _ in range(20):
        indices = torch.randint(len(data), (8,))
        text, _ = data.mismatched(indices, slots)
        rows = [next(i for i in range(len(captions)) if torch.equal(data.text_tokens[i].float(), t)) for t in text]
        own = slots[data.caption_ids[indices]]
        assert ((slots[rows] != own).any(dim=1)).all()
    for _ in range(20):  # hard negatives: the same colour and motion, another shape
        indices = torch.tensor([0, 1, 2, 5, 6, 7, 8, 9])  # the clips another clip contradicts in shape alone
        text, _ = data.mismatched(indices, slots, differ=("shape",))
        rows = [next(i for i in range(len(captions)) if torch.equal(data.text_tokens[i].float(), t)) for t in text]
        own = slots[data.caption_ids[indices]]
        assert (slots[rows][:, 1] != own[:, 1]).all() and (slots[rows][:, [0, 2]] == own[:, [0, 2]]).all()
    with pytest.raises(ValueError, match=r"no caption contradicts clip 3 .* in shape alone"):
        data.mismatched(torch.tensor([3]), slots, differ=("shape",))  # no other red clip moves up
    with pytest.raises(ValueError, match="differ must name"):
        data.mismatched(torch.tensor([0]), slots, differ=("size",))
        assert not set(rows) & {0}


def test_matching_aware_d_rates_real_clips_under_wrong_captions_as_fakes(parts, cfg, monkeypatch):
    cfg = dataclasses.replace(cfg, mismatch_weight=0.5)
    data = tiny_latents()
    x, text, mask = real_batch(data)
    wrong_text, wrong_mask = data.text_tokens[[2, 1]].float(), data.text_mask[[2, 1]]
    t, eps = torch.full((2,), 0.5), torch.randn_like(x)
    fake = torch.randn_like(x)
    losses = d_losses(parts.disc, x, fake, text, mask, t, eps, None, cfg, (wrong_text, wrong_mask))
    plain = d_losses(parts.disc, x, fake, text, mask, t, eps, None, dataclasses.replace(cfg, mismatch_weight=0.0))
    by_hand = torch.nn.functional.softplus(parts.disc(x, t, wrong_text, wrong_mask)).mean()
    torch.testing.assert_close(losses["mismatch"], by_hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["total"], plain["total"] + 0.5 * by_hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["d_loss"], plain["d_loss"], rtol=1e-4, atol=1e-6)  # the same real and fake logits
    logged = d_step(parts, data, cfg)
    assert {"d_mismatch", "mismatch"} <= set(logged)
    # swapped negatives: each row's caption with one attribute changed (here rows 1 and 2 swap to each other)
    swaps = torch.full((3, 3, 6), -1, dtype=torch.long)
    swaps[1, 1, 1], swaps[2, 1, 0] = 2, 1
    swapping = dataclasses.replace(data, swapped_ids=swaps)
    calls = []
    original = LatentSet.swapped
    monkeypatch.setattr(LatentSet, "swapped", lambda self, *a: calls.append(a) or original(self, *a))
    logged = d_step(parts, swapping, dataclasses.replace(cfg, mismatch_captions="swapped", mismatch_differ=("shape",)))
    assert {"d_mismatch", "mismatch"} <= set(logged) and calls and calls[0][1] == ("shape",)
    with pytest.raises(ValueError, match="mismatch_captions"):
        dataclasses.replace(cfg, mismatch_captions="random")


def shape_like_latents(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of two kinds told apart only by a small pattern at latent resolution (a 2x2 bump in channel 0 or in
    channel 1, at a random position), in noise: (latents, kind)."""
    x = 0.5 * torch.randn(n, *LATENT, generator=generator)
    kind = torch.arange(n) % 2
    for i in range(n):
        r, c = torch.randint(LATENT[2] - 1, (2,), generator=generator).tolist()
        x[i, int(kind[i]), :, r : r + 2, c : c + 2] += 2.0
    return x, kind


def test_matching_branch_starts_silent_then_learns_which_caption_a_clip_matches(teacher, cfg):
    cfg = dataclasses.replace(cfg, matching_branch=True, lr_branch=1e-2)
    torch.manual_seed(0)
    parts = make_parts(teacher, tiny_dit(2), cfg)
    branch = parts.disc.branch
    data = tiny_latents()
    x, text, mask = real_batch(data)
    assert torch.equal(branch(x, text, mask), torch.zeros(2))  # a trained D's logits are unchanged at first
    assert set(map(id, parts.opt_branch.param_groups[0]["params"])) == set(map(id, branch.parameters()))
    assert not set(map(id, parts.opt_d.param_groups[0]["params"])) & set(map(id, branch.parameters()))
    set_learning_rates(parts, 0, cfg)
    assert parts.opt_branch.param_groups[0]["lr"] == pytest.approx(1e-2)
    d_step(parts, data, cfg)  # D's step updates the branch too
    assert branch.text.weight.abs().sum() > 0

    # Trained alone as a matching classifier (caption row 1 for kind 0, row 2 for kind 1), it reads the pattern.
    g = torch.Generator().manual_seed(1)
    captions = data.text_tokens[1:3].float(), data.text_mask[1:3]
    for _ in range(150):
        x, kind = shape_like_latents(16, g)
        own = branch(x, captions[0][kind], captions[1][kind])
        wrong = branch(x, captions[0][1 - kind], captions[1][1 - kind])
        loss = torch.nn.functional.softplus(-own).mean() + torch.nn.functional.softplus(wrong).mean()
        parts.opt_branch.zero_grad(set_to_none=True)
        loss.backward()
        parts.opt_branch.step()
    x, kind = shape_like_latents(32, g)
    with torch.no_grad():
        gap = branch(x, captions[0][kind], captions[1][kind]) - branch(x, captions[0][1 - kind], captions[1][1 - kind])
    assert (gap > 0).all()


def test_a_run_from_before_the_matching_branch_resumes_with_a_fresh_one(teacher, cfg):
    torch.manual_seed(0)
    before = make_parts(teacher, tiny_dit(2), cfg)
    d_step(before, tiny_latents(), cfg)
    state = before.state_dict()
    with_branch = dataclasses.replace(cfg, matching_branch=True)
    after = make_parts(teacher, tiny_dit(3), with_branch)
    after.load_state_dict(state)
    old = before.disc.state_dict()
    assert all(torch.equal(v, old[k]) for k, v in after.disc.state_dict().items() if not k.startswith("branch."))
    assert after.opt_d.state_dict()["state"].keys() == state["opt_d"]["state"].keys()
    assert after.opt_branch.state_dict()["state"] == {} and after.fresh_branch
    set_learning_rates(after, 0, with_branch)
    assert after.opt_branch.param_groups[0]["lr"] == pytest.approx(cfg.lr_d)  # lr_branch None: D's
    x, text, mask = real_batch(tiny_latents())
    t = torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(after.disc(x, t, text, mask), before.disc(x, t, text, mask))
    d_step(after, tiny_latents(), with_branch)
    resumed = make_parts(teacher, tiny_dit(3), with_branch)
    resumed.load_state_dict(after.state_dict())  # its own state, branch and its optimizer included
    assert resumed.opt_branch.state_dict()["state"].keys() == after.opt_branch.state_dict()["state"].keys()
    assert not resumed.fresh_branch  # so a resumed run does not warm its branch up again
    with pytest.raises(RuntimeError, match="branch"):
        make_parts(teacher, tiny_dit(3), cfg).load_state_dict(after.state_dict())


def test_branch_warmup_trains_the_branch_alone_on_swapped_captions(teacher, cfg):
    cfg = dataclasses.replace(
        cfg,
        matching_branch=True,
        lr_branch=1e-2,
        branch_warmup=3,
        mismatch_weight=0.5,
        mismatch_captions="swapped",
        mismatch_differ=("shape",),
    )
    swaps = torch.full((3, 3, 6), -1, dtype=torch.long)
    swaps[1, 1, 1], swaps[2, 1, 0] = 2, 1  # caption rows 1 and 2 are each other's shape swap
    data = dataclasses.replace(tiny_latents(), swapped_ids=swaps)
    torch.manual_seed(0)
    parts = make_parts(teacher, tiny_dit(2), cfg)
    main = {k: v.clone() for k, v in parts.disc.state_dict().items() if not k.startswith("branch.")}
    generator = {k: v.clone() for k, v in parts.generator.state_dict().items()}
    set_learning_rates(parts, 0, cfg)
    warm = stage_apt.warm_up_branch(parts, data, cfg)
    assert set(warm) == {"loss", "right"} and 0.0 <= warm["right"] <= 1.0 and not parts.fresh_branch
    assert parts.disc.branch.text.weight.abs().sum() > 0
    after = parts.disc.state_dict()
    assert all(torch.equal(after[k], v) for k, v in main.items())
    assert all(torch.equal(parts.generator.state_dict()[k], v) for k, v in generator.items())
