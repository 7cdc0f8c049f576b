"""A Wan2.1 diffusers folder (WanPipeline.save_pretrained at a tiny random config, transformer sharded) read by our
loader and run through our Pipeline, against WanPipeline itself (a test-only oracle): one step equal in latents,
the decoded video equal, guided many-step sampling wired to the folder's settings; override specs, sigma lists and
the errors for what we do not serve.
"""

import json
import shutil

import pytest
import torch

from aptserve.engines import sampling
from aptserve.engines.loading import CheckpointError, load_model
from aptserve.engines.pipeline import Pipeline
from aptserve.engines.wan import WanTransformer
from aptserve.engines.wan_loading import WAN_NEGATIVE_PROMPT, WAN_SIZES, is_wan_source, load_wan

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle for the Wan2.1 loader")

LATENT_ATOL = 1e-5
PROMPTS = ["a red circle moving left on the grass", "cat"]
SIZE, FRAMES = (32, 48), 5  # (W, H): 2 latent frames of 6x4


@pytest.fixture(scope="module")
def pipeline(tiny_wan_folder) -> Pipeline:
    return Pipeline.from_name(str(tiny_wan_folder))


@pytest.fixture(scope="module")
def reference(tiny_wan_pipe):
    """The pipeline tiny_wan_folder was saved from, on FlowMatchEulerDiscreteScheduler (diffusers' conversion
    script's scheduler for Wan): its one step runs the transformer at timestep 1000 as ours does. The folder's UniPC
    starts its grid at 999 (sigma 1.0, timestep 999), which moves a one-step sample by about 0.15."""
    return diffusers.WanPipeline(
        **{**tiny_wan_pipe.components, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)}
    )


def test_folder_config_follows_the_diffusers_configs(pipeline, tiny_wan_folder):
    config = pipeline.config
    assert config.arch == "wan2.1" and isinstance(pipeline.dit, WanTransformer)
    assert (config.dit.depth, config.dit.hidden_size, config.dit.num_heads, config.dit.ffn_dim) == (2, 64, 4, 128)
    assert (config.dit.text_dim, config.dit.text_len, config.text.kind, config.text.max_length) == (
        32,
        512,
        "umt5",
        512,
    )
    assert config.vae.layout == "wan2.1" and config.vae.base_channels == 8
    vae_json = json.loads((tiny_wan_folder / "vae" / "config.json").read_text())
    assert config.vae.latent_mean == pytest.approx(vae_json["latents_mean"])
    assert config.vae.latent_std == pytest.approx(vae_json["latents_std"])
    assert (config.fps, config.sizes, config.default_size) == (16, WAN_SIZES, (832, 480))
    assert (config.default_steps, config.guidance_scale, config.sample_shift) == (50, 5.0, 3.0)
    assert config.negative_prompt == WAN_NEGATIVE_PROMPT and config.sample_sigmas == ()
    assert is_wan_source(tiny_wan_folder) and not is_wan_source(tiny_wan_folder / "vae")


def test_one_step_equals_wan_pipeline(pipeline, reference):
    request = pipeline.request(PROMPTS, seeds=[3, 4], size=SIZE, steps=1)
    request = type(request)(**{**request.__dict__, "frames": FRAMES})
    with torch.inference_mode():
        text, mask = pipeline.encode_text(request.prompts)
        ours = pipeline.denoise(request, text, mask)
        noise = sampling.get_noise(request.seeds, pipeline.latent_shape(request))
        theirs = reference(
            prompt=PROMPTS, height=SIZE[1], width=SIZE[0], num_frames=FRAMES, num_inference_steps=1,
            guidance_scale=1.0, latents=noise.clone(), output_type="latent",
        ).frames  # fmt: skip
    assert ours.shape == theirs.shape == (2, 16, 2, 6, 4)
    assert (ours - theirs).abs().max().item() < LATENT_ATOL, (ours - theirs).abs().max().item()

    # and the streamed video: our chunked decode of those latents against the reference VAE's whole decode
    video, _ = pipeline.generate_video(request)
    vae = reference.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        pixels = vae.decode(theirs * std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 4, 1)
    assert video.shape == (2, FRAMES, SIZE[1], SIZE[0], 3)
    assert (torch.from_numpy(video).float() - expected).abs().max().item() <= 1.0  # a rounding step at most


def test_guided_steps_use_the_negative_prompt_and_the_folder_shift(pipeline, monkeypatch):
    """Many steps: Euler on the scheduler's flow shift with CFG 5 against Wan's negative prompt by default."""
    seen = []
    real = pipeline.encode_text
    monkeypatch.setattr(pipeline, "encode_text", lambda prompts: seen.append(list(prompts)) or real(prompts))
    request = pipeline.request("cat", seeds=1, size=SIZE, steps=3)
    request = type(request)(**{**request.__dict__, "frames": 1})
    with torch.inference_mode():
        text, mask = real(request.prompts)
        got = pipeline.denoise(request, text, mask)
        neg_text, neg_mask = real([WAN_NEGATIVE_PROMPT])
        z = sampling.get_noise([1], pipeline.latent_shape(request))

        def v(x, t, tx, m):
            return pipeline.dit(x, t, tx, m)

        velocity = sampling.guided(lambda x, t: v(x, t, text, mask), lambda x, t: v(x, t, neg_text, neg_mask), 5.0)
        expected = sampling.euler(velocity, z, 3, 3.0)
    assert seen == [[WAN_NEGATIVE_PROMPT]]
    torch.testing.assert_close(got, expected)


def test_spec_file_overrides_sampling_and_sigma_list_renoises(tiny_wan_folder, tmp_path):
    sigmas = [1.0, 0.9375, 0.8333, 0.625]  # 1000/750/500/250 warped by shift 5: a 4-step distilled checkpoint
    spec = tmp_path / "four-step.json"
    spec.write_text(json.dumps({"base": str(tiny_wan_folder), "name": "wan-4step", "sample_sigmas": sigmas}))
    pipe = Pipeline.from_name(str(spec))
    config = pipe.config
    assert (config.name, config.default_steps, config.guidance_scale, config.sample_sigmas) == (
        "wan-4step", 4, 1.0, tuple(sigmas)
    )  # fmt: skip
    request = pipe.request("cat", seeds=2, size=SIZE)
    request = type(request)(**{**request.__dict__, "frames": 1})
    with torch.inference_mode():
        text, mask = pipe.encode_text(request.prompts)
        got = pipe.denoise(request, text, mask)
        shape = pipe.latent_shape(request)
        x = sampling.get_noise([2], shape)
        x0 = x - pipe.dit(x, torch.ones(1), text, mask)
        for k, sigma in enumerate(sigmas[1:], start=1):  # predict x0, re-noise to the next sigma, predict again
            eps = sampling.get_noise([2 + 1_000_003 * k], shape)
            x = (1 - sigma) * x0 + sigma * eps
            x0 = x - sigma * pipe.dit(x, torch.full((1,), sigma), text, mask)
    torch.testing.assert_close(got, x0)


def test_spec_in_the_folder_and_bad_specs(tiny_wan_folder, tmp_path):
    folder = tmp_path / "wan"
    shutil.copytree(tiny_wan_folder, folder)
    (folder / "aptserve.json").write_text(json.dumps({"fps": 24, "sizes": [[64, 48]], "default_size": [64, 48]}))
    config = load_wan(folder).config
    assert (config.fps, config.sizes, config.default_size) == (24, ((64, 48),), (64, 48))

    (folder / "aptserve.json").write_text(json.dumps({"sample_sigmas": [0.9, 0.5]}))
    with pytest.raises(CheckpointError, match=r"sample_sigmas must start at 1\.0"):
        load_wan(folder)
    (folder / "aptserve.json").write_text(json.dumps({"steps": 4}))
    with pytest.raises(CheckpointError, match=r"unknown keys \['steps'\]"):
        load_wan(folder)
    spec = tmp_path / "no-base.json"
    spec.write_text("{}")
    with pytest.raises(CheckpointError, match="needs `base`"):
        load_model(str(spec))


def _edit_json(file, **changes):
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, **changes}))


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        ("model_index.json", {"_class_name": "WanImageToVideoPipeline"}, "image-to-video"),
        ("model_index.json", {"_class_name": "WanVACEPipeline"}, "VACE"),
        ("model_index.json", {"transformer_2": ["diffusers", "WanTransformer3DModel"]}, "two-expert"),
        ("transformer/config.json", {"image_dim": 1280, "added_kv_proj_dim": 64}, "image-to-video"),
        ("transformer/config.json", {"in_channels": 48}, "Wan2.2 TI2V 5B"),
        ("vae/config.json", {"z_dim": 48, "is_residual": True}, "Wan2.2 VAE"),
    ],
)
def test_unsupported_variants_are_named(tiny_wan_folder, tmp_path, file, changes, message):
    folder = tmp_path / "wan"
    shutil.copytree(tiny_wan_folder, folder)
    _edit_json(folder / file, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_wan(folder)


def test_missing_shard_and_stray_tensor_are_named(tiny_wan_folder, tmp_path):
    folder = tmp_path / "wan"
    shutil.copytree(tiny_wan_folder, folder)
    shard = sorted((folder / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{shard.name}'\\]"):
        load_wan(folder)

    shutil.rmtree(folder)
    shutil.copytree(tiny_wan_folder, folder)
    from safetensors.torch import load_file, save_file

    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae_file)
    save_file({**tensors, "decoder.extra.weight": torch.zeros(1)}, vae_file)
    with pytest.raises(CheckpointError, match=r"decoder\.extra\.weight"):
        load_wan(folder)


def test_bf16_load_keeps_time_embedding_and_tables_in_fp32(tiny_wan_folder):
    model = load_wan(tiny_wan_folder, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.dit.named_parameters()}
    assert dtypes["time_embed.0.weight"] == dtypes["blocks.0.mod_table"] == dtypes["final_table"] == torch.float32
    assert dtypes["blocks.0.cross_norm.weight"] == torch.float32
    assert dtypes["blocks.0.self_attn.qkv.weight"] == dtypes["time_mod.1.weight"] == torch.bfloat16
    assert model.config.text.dtype == "bfloat16"


def test_spec_loads_original_format_weights_and_merges_a_lora(tiny_wan_folder, tmp_path):
    """A few-step checkpoint as lightx2v ships it: original Wan keys in one file, plus a LoRA in original naming
    (lora_down / lora_up / alpha) at half strength; the served generator equals diffusers' model given those weights
    (renamed by diffusers' own converter) with the LoRA added by hand."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import save_file

    from tests.engines.test_wan import diffusers_transformer
    from tests.engines.test_wan_formats import original_transformer

    original = original_transformer(seed=5)  # wan-tiny's shape, the tiny folder's transformer's shape
    save_file(original, tmp_path / "distilled.safetensors")
    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    lora = {
        "diffusion_model.blocks.1.cross_attn.k.lora_down.weight": down,
        "diffusion_model.blocks.1.cross_attn.k.lora_up.weight": up,
        "diffusion_model.blocks.1.cross_attn.k.alpha": torch.tensor(2.0),
    }
    save_file(lora, tmp_path / "style_lora.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "base": str(tiny_wan_folder),
                "transformer": "distilled.safetensors",
                "loras": [{"path": "style_lora.safetensors", "scale": 0.5}],
            }
        )
    )
    ours = load_wan(spec).dit

    named = convert_wan_transformer_to_diffusers(dict(original))
    named["blocks.1.attn2.to_k.weight"] = named["blocks.1.attn2.to_k.weight"] + 0.5 * (2.0 / 4) * up @ down
    reference = diffusers_transformer()
    reference.load_state_dict(named, strict=True)
    g = torch.Generator().manual_seed(7)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 512, 32, generator=g)
    with torch.no_grad():
        expected = reference(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text)[0]
        got = ours(x, torch.tensor([0.7]), text, torch.ones(1, 512, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    lora["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = down.clone()
    save_file(lora, tmp_path / "style_lora.safetensors")
    with pytest.raises(CheckpointError, match="image-to-video"):
        load_wan(spec)
