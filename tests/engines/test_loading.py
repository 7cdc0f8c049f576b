import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aptserve.engines.config import MODEL_PRESETS, ModelConfig
from aptserve.engines.loading import (
    CheckpointError,
    load_checkpoint,
    load_model,
    random_model,
    resolve_model,
    save_checkpoint,
    storage_dtype,
)


@pytest.fixture(scope="module")
def tiny():
    return random_model(MODEL_PRESETS["tiny"], seed=3)


@pytest.fixture
def checkpoint(tmp_path, tiny):
    return save_checkpoint(tmp_path / "ckpt", tiny.config, {"dit": tiny.dit, "vae": tiny.vae})


def test_round_trip_preserves_config_and_every_tensor(checkpoint, tiny):
    loaded = load_checkpoint(checkpoint)
    assert loaded.config == tiny.config
    for name in ("dit", "vae"):
        expected, got = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
            assert got[key].device.type == "cpu"
    assert load_model(str(checkpoint)).source == str(checkpoint)


def test_float16_storage_halves_the_file_and_loads_in_float32(checkpoint, tiny, tmp_path):
    half = save_checkpoint(tmp_path / "half", tiny.config, {"dit": tiny.dit, "vae": tiny.vae}, storage_dtype("float16"))
    stored = load_file(str(half / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    size = (half / "model.safetensors").stat().st_size
    assert size < 0.51 * (checkpoint / "model.safetensors").stat().st_size
    loaded = load_checkpoint(half)
    for name in ("dit", "vae"):
        expected = getattr(tiny, name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            assert value.dtype == expected[key].dtype  # loaded in the model's dtype, not the storage's
            torch.testing.assert_close(value, expected[key], rtol=1e-3, atol=1e-4)  # float16 rounding only
    with pytest.raises(ValueError, match="float16"):
        storage_dtype("fp17")


def test_config_round_trips_through_json():
    for config in MODEL_PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_load_in_bfloat16(checkpoint):
    loaded = load_checkpoint(checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.dit.parameters()} == {torch.bfloat16}


def rewrite_weights(checkpoint, edit):
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, checkpoint / "model.safetensors")


def test_missing_and_unexpected_keys_are_named(checkpoint):
    def edit(t):
        t.pop("dit.final_proj.weight")
        t["dit.extra.weight"] = torch.zeros(1)

    rewrite_weights(checkpoint, edit)
    with pytest.raises(CheckpointError, match=r"missing keys \[final_proj.weight\].*unexpected keys \[extra.weight\]"):
        load_checkpoint(checkpoint)


def test_shape_mismatch_is_named(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.__setitem__("vae.decoder.head.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"shape mismatches \[decoder.head.weight: checkpoint \(2, 2\)"):
        load_checkpoint(checkpoint)


def test_stray_component_is_named(checkpoint):
    save_file({"unet.w": torch.zeros(1)}, checkpoint / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected components \['unet'\]"):
        load_checkpoint(checkpoint)


def test_config_problems(checkpoint, tmp_path):
    config_file = checkpoint / "config.json"
    data = json.loads(config_file.read_text())
    data["dit"]["hidden_size"] = 250
    config_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not divisible by num_heads"):
        load_checkpoint(checkpoint)
    data["dit"]["hidden_size"] = 256
    data["dit"]["depth_typo"] = 3
    config_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"unknown keys in config section 'dit': \['depth_typo'\]"):
        load_checkpoint(checkpoint)
    config_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad config\.json"):
        load_checkpoint(checkpoint)
    config_file.unlink()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_no_weights_or_corrupt_weights(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot read model\.safetensors"):
        load_checkpoint(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_checkpoint(checkpoint)


def test_mismatched_components_in_model_config():
    base = MODEL_PRESETS["tiny"]
    with pytest.raises(ValueError, match="text_dim"):
        ModelConfig(
            "x",
            dit=MODEL_PRESETS["apt-8b"].dit.__class__(depth=1, hidden_size=64, num_heads=4, text_dim=7),
            vae=base.vae,
        )
    with pytest.raises(ValueError, match="multiples of 16"):
        ModelConfig("x", dit=base.dit, vae=base.vae, default_size=(60, 64))


def test_resolve_model(checkpoint):
    assert resolve_model("tiny") == "tiny"
    assert resolve_model(str(checkpoint)) == checkpoint
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        resolve_model("nope")
