"""The light-decoder stage at toy sizes: it trains, survives an interruption, resumes, and exports a loadable VAE."""

import csv
import dataclasses

import pytest
import torch

from aptserve.engines.config import MODEL_PRESETS
from aptserve.engines.dit import MMDiT
from aptserve.engines.loading import load_components, load_light_decoder, save_checkpoint
from aptserve.engines.vae import CausalVAE
from aptserve.training import stage
from aptserve.training import stage_decoder as decoder_stage
from aptserve.training.stage_decoder import DecoderStageConfig, train_decoder


class Killed(Exception):
    """The process dying mid-run: no chance to save beyond the periodic checkpoints."""


@pytest.fixture
def teacher(tmp_path):
    """A random tiny model (generator + VAE) standing in for the served checkpoint."""
    config = dataclasses.replace(MODEL_PRESETS["tiny"], name="toy")
    torch.manual_seed(0)
    vae, dit = CausalVAE(config.vae), MMDiT(config.dit)
    dit.init_weights()
    return save_checkpoint(tmp_path / "toy", config, {"dit": dit, "vae": vae})


def steps_logged(run) -> list[int]:
    with open(run / "losses.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_decoder_stage_resumes_after_an_interruption_and_exports(tmp_path, teacher, monkeypatch):
    assert stage("decoder") == (DecoderStageConfig, train_decoder)
    cfg = DecoderStageConfig(
        out=str(tmp_path / "run"),
        export=str(tmp_path / "light"),
        teacher=str(teacher),
        latents=str(tmp_path / "latents.pt"),
        latent_clips=2,
        frames=5,
        height=32,
        width=32,
        steps=2,
        warmup=1,
        checkpoint_every=1,
        log_every=1,
    )
    real_batch, calls = decoder_stage.latent_batch, []

    def killed_at_step_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise Killed  # after step 1's periodic checkpoint
        return real_batch(*args)

    monkeypatch.setattr(decoder_stage, "latent_batch", killed_at_step_two)
    with pytest.raises(Killed):
        train_decoder(cfg, progress=False)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == 1
    assert not (tmp_path / "light").exists()

    monkeypatch.setattr(decoder_stage, "latent_batch", real_batch)
    assert train_decoder(cfg, progress=False) == tmp_path / "light"
    assert steps_logged(tmp_path / "run") == [1, 2]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["stage"]["ema"]["updates"] == 2

    config, modules = load_components(tmp_path / "light", ("vae",))
    teacher_config, teacher_modules = load_components(teacher, ("vae",))
    light, full = modules["vae"], teacher_modules["vae"]
    assert config.light_decoder is None and config.dit == teacher_config.dit
    assert light.config == dataclasses.replace(full.config, decoder_base_channels=8, decoder_res_blocks=1)
    for name, value in full.encoder.state_dict().items():  # the encoder is the teacher's, untouched (float16 on disk)
        torch.testing.assert_close(light.encoder.state_dict()[name], value.half().float())
    for name, value in light.decoder.state_dict().items():  # the export is the EMA decoder
        torch.testing.assert_close(value, state["stage"]["ema"]["shadow"][name].half().float())
    named = dataclasses.replace(teacher_config, light_decoder=str(tmp_path / "light"))
    assert load_light_decoder(named).config == light.config


def test_decoder_stage_config_checks_its_numbers():
    with pytest.raises(ValueError, match="generated_fraction"):
        DecoderStageConfig(generated_fraction=1.5)
    with pytest.raises(ValueError, match="min_lr"):
        DecoderStageConfig(lr=1e-4, min_lr=1e-3)


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = DecoderStageConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    rates = [decoder_stage.lr_at(i, cfg) for i in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10:] == sorted(rates[10:], reverse=True) and rates[-1] == pytest.approx(1e-4, rel=0.01)
