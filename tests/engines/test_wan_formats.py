"""Wan2.1 checkpoint formats against diffusers (a test-only oracle): original-layout transformer and VAE checkpoints,
built here from Wan-AI's own module names and shapes, must rename exactly as diffusers' single-file converters do
and load strictly; LoRAs in each layout must convert as diffusers' LoRA converters do and merge to the explicit
fp32 sum (and, with peft installed, to diffusers' own fuse_lora)."""

import itertools

import pytest
import torch

from aptserve.engines.vae import CausalVAE, VAEConfig
from aptserve.engines.wan import WAN_PRESETS, WanConfig, WanTransformer, diffusers_to_ours
from aptserve.engines.wan_formats import (
    detect_format,
    detect_vae_format,
    lora_to_diffusers,
    merge_loras,
    original_to_diffusers_transformer,
    original_to_diffusers_vae,
)
from aptserve.engines.wan_vae import diffusers_vae_to_ours
from tests.engines.test_wan import diffusers_transformer
from tests.engines.test_wan_vae import TINY as TINY_VAE

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle for Wan2.1 checkpoint formats")
from diffusers.loaders.lora_conversion_utils import (  # noqa: E402
    _convert_musubi_wan_lora_to_diffusers,
    _convert_non_diffusers_wan_lora_to_diffusers,
)
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

TINY = WAN_PRESETS["wan-tiny"]
RANK = 4
# Original per-block linear -> diffusers (WAN.md's rename table), for writing PEFT-layout LoRAs and references.
LINEARS = {
    **{f"self_attn.{a}": f"attn1.{b}" for a, b in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"cross_attn.{a}": f"attn2.{b}" for a, b in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: 0.2 * torch.randn(shape, generator=g) for key, shape in shapes.items()}


def _linear(name: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_dim, in_dim), f"{name}.bias": (out_dim,)}


def original_transformer(config: WanConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint named and shaped as Wan-AI's WanModel (wan/modules/model.py) builds a T2V model."""
    d = config.hidden_size
    shapes = {
        "patch_embedding.weight": (d, config.in_channels, *config.patch_size),
        "patch_embedding.bias": (d,),
        **_linear("text_embedding.0", d, config.text_dim),
        **_linear("text_embedding.2", d, d),
        **_linear("time_embedding.0", d, config.freq_dim),
        **_linear("time_embedding.2", d, d),
        **_linear("time_projection.1", 6 * d, d),
        **_linear("head.head", config.patch_volume * config.out_channels, d),
        "head.modulation": (1, 2, d),
    }
    for i in range(config.depth):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes |= _linear(f"blocks.{i}.{attn}.{proj}", d, d)
            shapes |= {f"blocks.{i}.{attn}.norm_q.weight": (d,), f"blocks.{i}.{attn}.norm_k.weight": (d,)}
        shapes |= {
            f"blocks.{i}.norm3.weight": (d,),
            f"blocks.{i}.norm3.bias": (d,),
            f"blocks.{i}.modulation": (1, 6, d),
        }
        shapes |= _linear(f"blocks.{i}.ffn.0", config.ffn_dim, d) | _linear(f"blocks.{i}.ffn.2", d, config.ffn_dim)
    return _random(shapes, seed)


def original_vae(config: VAEConfig = TINY_VAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint named and shaped as Wan-AI's WanVAE_ (wan/modules/vae.py, Wan2.1_VAE.pth) builds it:
    stages of res blocks with a resample between them, temporal in encoder stages 1-2 and decoder stages 0-1."""
    z, mults, n = config.latent_channels, config.channel_mults, config.num_res_blocks
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, *kernel: int) -> None:
        shapes.update({f"{name}.weight": (c_out, c_in, *kernel), f"{name}.bias": (c_out,)})

    def res_block(name: str, c_in: int, c_out: int) -> None:
        shapes[f"{name}.residual.0.gamma"] = (c_in, 1, 1, 1)
        conv(f"{name}.residual.2", c_out, c_in, 3, 3, 3)
        shapes[f"{name}.residual.3.gamma"] = (c_out, 1, 1, 1)
        conv(f"{name}.residual.6", c_out, c_out, 3, 3, 3)
        if c_in != c_out:
            conv(f"{name}.shortcut", c_out, c_in, 1, 1, 1)

    def middle(coder: str, c: int) -> None:
        res_block(f"{coder}.middle.0", c, c)
        shapes[f"{coder}.middle.1.norm.gamma"] = (c, 1, 1)
        conv(f"{coder}.middle.1.to_qkv", 3 * c, c, 1, 1)
        conv(f"{coder}.middle.1.proj", c, c, 1, 1)
        res_block(f"{coder}.middle.2", c, c)

    conv("conv1", 2 * z, 2 * z, 1, 1, 1)
    conv("conv2", z, z, 1, 1, 1)
    dims = [config.base_channels * m for m in (1, *mults)]
    conv("encoder.conv1", dims[0], 3, 3, 3, 3)
    index = 0
    for stage, (c_in, c_out) in enumerate(itertools.pairwise(dims)):
        for _ in range(n):
            res_block(f"encoder.downsamples.{index}", c_in, c_out)
            c_in, index = c_out, index + 1
        if stage < len(mults) - 1:
            conv(f"encoder.downsamples.{index}.resample.1", c_out, c_out, 3, 3)
            if stage > 0:
                conv(f"encoder.downsamples.{index}.time_conv", c_out, c_out, 3, 1, 1)
            index += 1
    middle("encoder", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z, dims[-1], 3, 3, 3)
    dims = [config.base_channels * m for m in (mults[-1], *reversed(mults))]
    conv("decoder.conv1", dims[0], z, 3, 3, 3)
    middle("decoder", dims[0])
    index = 0
    for stage, (c_in, c_out) in enumerate(itertools.pairwise(dims)):
        c_in = c_in // 2 if stage > 0 else c_in  # the previous upsampler halved the channels
        for _ in range(n + 1):
            res_block(f"decoder.upsamples.{index}", c_in, c_out)
            c_in, index = c_out, index + 1
        if stage < len(mults) - 1:
            conv(f"decoder.upsamples.{index}.resample.1", c_out // 2, c_out, 3, 3)
            if stage < 2:
                conv(f"decoder.upsamples.{index}.time_conv", 2 * c_out, c_out, 3, 1, 1)
            index += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], 3, 3, 3)
    return _random(shapes, seed)


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k] is theirs[k] for k in ours), "a renamed tensor must be passed through, not copied or changed"


# ---------------------------------------------------------------------------------------------------------------
# Transformer and VAE checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_original_transformer_renames_as_diffusers_converter_with_any_prefix():
    original = original_transformer()
    ours = original_to_diffusers_transformer(original)
    _assert_same_tensors(ours, convert_wan_transformer_to_diffusers(dict(original)))  # it pops from its input
    for prefix in ("model.", "diffusion_model.", "model.diffusion_model."):
        _assert_same_tensors(original_to_diffusers_transformer({prefix + k: v for k, v in original.items()}), ours)


@torch.no_grad()
def test_original_transformer_loads_strictly_and_runs_like_diffusers():
    diffusers_named = original_to_diffusers_transformer(original_transformer())
    reference = diffusers_transformer()
    reference.load_state_dict(diffusers_named, strict=True)
    ours = WanTransformer(TINY).eval()
    ours.load_state_dict(diffusers_to_ours(diffusers_named), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, TINY.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g)
    t = torch.tensor([0.6])
    expected = reference(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    out = ours(x, t, text, torch.ones(1, TINY.text_len, dtype=torch.bool))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_original_vae_renames_as_diffusers_converter_and_loads_strictly():
    original = original_vae()
    ours = original_to_diffusers_vae(original, TINY_VAE.num_res_blocks)
    _assert_same_tensors(ours, convert_wan_vae_to_diffusers(dict(original)))
    reference = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, num_res_blocks=2)
    reference.load_state_dict(ours, strict=True)
    CausalVAE(TINY_VAE).load_state_dict(diffusers_vae_to_ours(ours, TINY_VAE), strict=True)


def test_detect_format():
    assert detect_format(original_transformer()) == "original"
    assert detect_format({"model.diffusion_model." + k: v for k, v in original_transformer().items()}) == "original"
    diffusers_named = original_to_diffusers_transformer(original_transformer())
    assert detect_format(diffusers_named) == "diffusers"
    assert detect_vae_format(original_vae()) == "original"
    assert detect_vae_format(original_to_diffusers_vae(original_vae())) == "diffusers"
    with pytest.raises(ValueError, match="neither"):
        detect_format(["encoder.conv1.weight"])
    with pytest.raises(ValueError, match="mixes"):
        detect_format(["blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"])
    with pytest.raises(ValueError, match="neither"):
        detect_vae_format(original_transformer())


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("blocks.0.self_attn.q.scale_weight", "unknown key 'blocks.0.self_attn.q.scale_weight'"),
        ("blocks.0.norm2.weight", "unknown key 'blocks.0.norm2.weight'"),
        ("img_emb.proj.1.weight", "image-to-video"),
        ("diffusion_model.blocks.0.cross_attn.k_img.weight", "image-to-video"),
        ("blocks.0.cross_attn.norm_k_img.weight", "image-to-video"),
        ("vace_blocks.0.before_proj.weight", "VACE"),
        ("vace_patch_embedding.weight", "VACE"),
        ("diffusion_model.patch_embedding.weight", "two keys map to 'patch_embedding.weight'"),
    ],
)
def test_original_transformer_rejects_unknown_unsupported_and_repeated_keys(key, message):
    with pytest.raises(ValueError, match=message):
        original_to_diffusers_transformer({**original_transformer(), key: torch.zeros(1)})


def test_original_vae_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key 'decoder\.upsamples\.3\.residual\.0\.gamma'"):
        original_to_diffusers_vae({**original_vae(), "decoder.upsamples.3.residual.0.gamma": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown key 'encoder\.middle\.3"):
        original_to_diffusers_vae({**original_vae(), "encoder.middle.3.norm.gamma": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------


def random_lora(modules: list[str], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Original module path -> (down, up, alpha), shaped for the tiny model's weights."""
    shapes = {k: v.shape for k, v in original_transformer().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, module in enumerate(modules):
        out_dim, in_dim = shapes[f"{module}.weight"]
        down, up = torch.randn(RANK, in_dim, generator=g), torch.randn(out_dim, RANK, generator=g)
        out[module] = (down, up, (1.0, 2.0, 6.0)[i % 3])
    return out


def as_original(lora, down="lora_down", up="lora_up", prefix="diffusion_model.") -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b, alpha) in lora.items():
        out |= {f"{prefix}{module}.{down}.weight": a, f"{prefix}{module}.{up}.weight": b}
        out[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
    return out


def as_kohya(lora) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b, alpha) in lora.items():
        name = "lora_unet_" + module.replace(".", "_")
        out |= {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": torch.tensor(alpha)}
    return out


def as_peft(lora) -> dict[str, torch.Tensor]:
    """diffusers' own layout, which carries no alpha tensors: alpha / rank is folded into lora_B."""
    out = {}
    for module, (a, b, alpha) in lora.items():
        name = "transformer." + diffusers_name(module).removesuffix(".weight")
        out |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b * (alpha / RANK)}
    return out


def diffusers_name(module: str) -> str:
    _, block, local = module.split(".", 2)
    return f"blocks.{block}.{LINEARS[local]}.weight"


def every_linear() -> list[str]:
    return [f"blocks.{i}.{local}" for i in range(TINY.depth) for local in LINEARS]


@pytest.mark.parametrize(
    ("write", "convert"),
    [
        (as_original, _convert_non_diffusers_wan_lora_to_diffusers),
        (lambda lora: as_original(lora, "lora_A", "lora_B"), _convert_non_diffusers_wan_lora_to_diffusers),
        (as_kohya, _convert_musubi_wan_lora_to_diffusers),
    ],
    ids=["original-lora_down", "original-lora_A", "kohya"],
)
def test_lora_conversion_matches_diffusers_converters(write, convert):
    lora = write(random_lora(every_linear()))  # the musubi converter needs every linear of every block
    if write is not as_kohya:
        lora |= {"diffusion_model.blocks.1.self_attn.q.diff_b": torch.randn(TINY.hidden_size)}
    theirs = convert({k: v.clone() for k, v in lora.items()})  # it scales tensors in place, folding in alpha / rank
    ours = lora_to_diffusers(lora)
    expected = {
        key.removeprefix("transformer.").replace(".lora_A.weight", ".weight"): value
        for key, value in theirs.items()
        if key.endswith("lora_A.weight")
    }
    assert sorted(ours) == sorted(expected)
    for name, pair in ours.items():
        delta = pair.alpha / RANK * pair.up @ pair.down
        theirs_delta = theirs[f"transformer.{name[: -len('weight')]}lora_B.weight"] @ expected[name]
        torch.testing.assert_close(delta, theirs_delta, rtol=1e-6, atol=1e-6)
    if write is not as_kohya:
        assert torch.equal(
            ours["blocks.1.attn1.to_q.weight"].diff_b, theirs["transformer.blocks.1.attn1.to_q.lora_B.bias"]
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "write",
    [as_original, lambda lora: as_original(lora, "lora_A", "lora_B", prefix=""), as_kohya, as_peft],
    ids=["original", "original-lora_A-unprefixed", "kohya", "peft"],
)
def test_merge_matches_explicit_fp32_sum(write, dtype):
    state = {k: v.to(dtype) for k, v in original_to_diffusers_transformer(original_transformer()).items()}
    before = {k: v.clone() for k, v in state.items()}
    first = random_lora(["blocks.0.self_attn.q", "blocks.1.cross_attn.k", "blocks.0.ffn.0"], seed=1)
    second = random_lora(["blocks.0.self_attn.q", "blocks.1.ffn.2"], seed=2)
    d = TINY.hidden_size
    extras = {  # full deltas as lightx2v LoRAs carry them: a norm, a bias, modulation tables (diff_m)
        "diffusion_model.blocks.0.norm3.diff": torch.randn(d),
        "diffusion_model.blocks.0.norm3.diff_b": torch.randn(d),
        "diffusion_model.blocks.1.self_attn.q.diff_b": torch.randn(d),
        "diffusion_model.blocks.1.diff_m": torch.randn(1, 6, d),
        "diffusion_model.head.diff_m": torch.randn(1, 2, d),
        "diffusion_model.blocks.0.modulation.diff": torch.randn(1, 6, d),
    }
    merged = merge_loras(state, [(write(first), 0.8), (as_original(second) | extras, -0.5)])

    expected = {k: v.to(torch.float32, copy=True) for k, v in before.items()}
    for lora, strength in ((first, 0.8), (second, -0.5)):
        for module, (down, up, alpha) in lora.items():
            expected[diffusers_name(module)] += strength * alpha / RANK * (up @ down)
    expected["blocks.0.norm2.weight"] += -0.5 * extras["diffusion_model.blocks.0.norm3.diff"]
    expected["blocks.0.norm2.bias"] += -0.5 * extras["diffusion_model.blocks.0.norm3.diff_b"]
    expected["blocks.1.attn1.to_q.bias"] += -0.5 * extras["diffusion_model.blocks.1.self_attn.q.diff_b"]
    expected["blocks.1.scale_shift_table"] += -0.5 * extras["diffusion_model.blocks.1.diff_m"]
    expected["scale_shift_table"] += -0.5 * extras["diffusion_model.head.diff_m"]
    expected["blocks.0.scale_shift_table"] += -0.5 * extras["diffusion_model.blocks.0.modulation.diff"]
    changed = {diffusers_name(m) for m in (*first, *second)} | {"blocks.1.attn1.to_q.bias", "scale_shift_table"}
    changed |= {
        "blocks.0.norm2.weight",
        "blocks.0.norm2.bias",
        "blocks.0.scale_shift_table",
        "blocks.1.scale_shift_table",
    }

    assert sorted(merged) == sorted(state)
    for name, value in merged.items():
        assert value.dtype == dtype
        if name in changed:
            torch.testing.assert_close(value, expected[name].to(dtype))
        else:
            assert value is state[name]
    assert all(torch.equal(state[k], before[k]) for k in state), "merge_loras must not modify its input"


def test_alpha_zero_or_absent_means_no_scaling():
    state = original_to_diffusers_transformer(original_transformer())
    lora = as_original(random_lora(["blocks.0.self_attn.q"]))
    without_alpha = {k: v for k, v in lora.items() if not k.endswith("alpha")}
    expected = merge_loras(state, [(without_alpha, 1.0)])["blocks.0.attn1.to_q.weight"]
    zero = merge_loras(state, [(lora | {"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(0.0)}, 1.0)])
    assert torch.equal(zero["blocks.0.attn1.to_q.weight"], expected)
    rank = merge_loras(state, [(lora | {"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(float(RANK))}, 1.0)])
    torch.testing.assert_close(rank["blocks.0.attn1.to_q.weight"], expected)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (
            as_original(random_lora(["blocks.0.self_attn.q"]))
            | {"diffusion_model.blocks.7.ffn.0.diff_b": torch.zeros(1)},
            "does not have: \\['blocks.7.ffn.net.0.proj.bias'\\]",
        ),
        ({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(RANK, 64)}, "image-to-video"),
        ({"lora_unet_blocks_0_cross_attn_v_img.lora_up.weight": torch.zeros(64, RANK)}, "image-to-video"),
        ({"diffusion_model.blocks.0.self_attn.q.lora_mid.weight": torch.zeros(1)}, "unknown LoRA key"),
        ({"lora_unet_blocks_0_self_attn_qq.lora_down.weight": torch.zeros(1)}, "'lora_unet_blocks_0_self_attn_qq"),
        ({"diffusion_model.blocks.0.self_attn.qq.lora_down.weight": torch.zeros(1)}, "'blocks.0.self_attn.qq'"),
        ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK)}, "only one of"),
        ({"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0)}, "alpha but no"),
        (
            {
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK + 1),
            },
            "ranks differ",
        ),
        (
            {
                "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(RANK, 64),
                "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(64, RANK),
            },
            "'blocks.0.ffn.net.0.proj.weight' has shape \\(64, 64\\)",
        ),
    ],
)
def test_bad_loras_raise_naming_the_problem(lora, message):
    state = original_to_diffusers_transformer(original_transformer())
    with pytest.raises(ValueError, match=message):
        merge_loras(state, [(lora, 1.0)])


@torch.no_grad()
def test_merge_matches_diffusers_fuse_lora():
    pytest.importorskip("peft", reason="peft (diffusers' LoRA backend) is not installed: no fuse_lora oracle")
    state = original_to_diffusers_transformer(original_transformer())
    lora = as_original(random_lora(every_linear(), seed=3))
    lora |= {"diffusion_model.blocks.0.ffn.2.diff_b": torch.randn(TINY.hidden_size)}
    reference = diffusers_transformer()
    reference.load_state_dict(state, strict=True)
    converted = diffusers.WanPipeline.lora_state_dict({k: v.clone() for k, v in lora.items()})
    reference.load_lora_adapter(converted, prefix="transformer")
    reference.fuse_lora(lora_scale=0.7)
    fused = {k.replace(".base_layer", ""): v for k, v in reference.state_dict().items() if "lora_" not in k}
    merged = merge_loras(state, [(lora, 0.7)])
    assert sorted(fused) == sorted(merged)
    for name, value in merged.items():
        torch.testing.assert_close(value, fused[name], rtol=1e-5, atol=1e-5)
