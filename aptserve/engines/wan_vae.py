"""Key map from diffusers' AutoencoderKLWan (Wan2.1) state dict to our CausalVAE in the "wan2.1" layout."""

from __future__ import annotations

import re

from torch import Tensor

from aptserve.engines.vae import VAE_PRESETS, VAEConfig

_PART = r"(norm1|conv1|norm2|conv2|conv_shortcut)"  # a res block's layers: ours keep the names but the shortcut's

# Module paths outside the encoder's flat down_blocks list: (diffusers pattern, ours); leaves renamed by _LEAVES.
_MODULES = (
    (r"quant_conv", "encoder.quant_conv"),
    (r"post_quant_conv", "decoder.post_quant_conv"),
    (r"(en|de)coder\.conv_in", r"\1coder.stem"),
    (r"(en|de)coder\.norm_out", r"\1coder.head_norm"),
    (r"(en|de)coder\.conv_out", r"\1coder.head"),
    (r"(en|de)coder\.mid_block\.resnets\.0\." + _PART, r"\1coder.mid.block1.\2"),
    (r"(en|de)coder\.mid_block\.resnets\.1\." + _PART, r"\1coder.mid.block2.\2"),
    (r"(en|de)coder\.mid_block\.attentions\.0\.norm", r"\1coder.mid.attn.norm"),
    (r"(en|de)coder\.mid_block\.attentions\.0\.to_qkv", r"\1coder.mid.attn.qkv"),
    (r"(en|de)coder\.mid_block\.attentions\.0\.proj", r"\1coder.mid.attn.proj"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\." + _PART, r"decoder.stages.\1.blocks.\2.\3"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.time_conv", r"decoder.stages.\1.resample.time.time_conv"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.resample\.1", r"decoder.stages.\1.resample.conv"),
)
_ENCODER_BLOCK = re.compile(r"encoder\.down_blocks\.(\d+)\.(.+)")
_ENCODER_RESAMPLE = {"resample.1": "resample.conv", "time_conv": "resample.time.conv"}
_RES_BLOCK_PARTS = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")
_LEAVES = {"gamma": "weight", "weight": "weight", "bias": "bias"}


def _encoder_block(index: int, local: str, num_res_blocks: int) -> str | None:
    """encoder.down_blocks.<index>.<local> module path -> ours: each stage is num_res_blocks res blocks, then (but
    in the last stage) one resample entry."""
    stage, j = divmod(index, num_res_blocks + 1)
    if j < num_res_blocks and local in _RES_BLOCK_PARTS:
        return f"encoder.stages.{stage}.blocks.{j}.{local}"
    if j == num_res_blocks and local in _ENCODER_RESAMPLE:
        return f"encoder.stages.{stage}.{_ENCODER_RESAMPLE[local]}"
    return None


def _rename(key: str, num_res_blocks: int) -> str:
    module, _, leaf = key.rpartition(".")
    ours = None
    if match := _ENCODER_BLOCK.fullmatch(module):
        ours = _encoder_block(int(match[1]), match[2], num_res_blocks)
    else:
        for pattern, target in _MODULES:
            if (match := re.fullmatch(pattern, module)) is not None:
                ours = match.expand(target)
                break
    if ours is None or leaf not in _LEAVES:
        raise KeyError(f"no mapping for diffusers key {key!r} (AutoencoderKLWan 2.1 layout expected)")
    return f"{ours.replace('conv_shortcut', 'shortcut')}.{_LEAVES[leaf]}"


def _reshape(name: str, value: Tensor) -> Tensor:
    """Wan's (C, 1, 1[, 1]) norm gammas -> (C,); 1x1 Conv2d attention weights -> Linear; 3x3 Conv2d -> Conv3d (1,3,3)."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "head_norm.weight")):
        return value.reshape(-1)
    if name.endswith(("attn.qkv.weight", "attn.proj.weight")):
        return value.flatten(1)  # (C_out, C_in, 1, 1) -> (C_out, C_in)
    if name.endswith("resample.conv.weight"):
        return value.unsqueeze(2)  # (C_out, C_in, 3, 3) -> (C_out, C_in, 1, 3, 3)
    return value


def diffusers_vae_to_ours(
    state_dict: dict[str, Tensor], config: VAEConfig = VAE_PRESETS["wan2.1"]
) -> dict[str, Tensor]:
    """Map an AutoencoderKLWan (Wan2.1) state dict onto `CausalVAE(config)`'s names for a layout="wan2.1" config.

    A rename plus reshapes: norm gammas flattened, 1x1 Conv2d attention weights to Linear, 3x3 Conv2d resample
    weights to (1, 3, 3) Conv3d. Every input tensor is used exactly once, or this raises. The latent statistics are
    not in the state dict: they are the config's latent_mean/latent_std (diffusers' config latents_mean/latents_std).
    """
    if not config.wan_layout:
        raise ValueError(f"diffusers_vae_to_ours needs a layout='wan2.1' VAEConfig, got layout={config.layout!r}")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = _rename(key, config.num_res_blocks)
        if name in out:
            raise ValueError(f"two diffusers keys map to {name!r}")
        out[name] = _reshape(name, value)
    return out
