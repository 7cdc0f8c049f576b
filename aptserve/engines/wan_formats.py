"""Wan2.1 checkpoint formats: the original (Wan-AI) transformer and VAE key layouts renamed to diffusers' names,
format detection, and LoRA files in the common layouts parsed and merged into a diffusers-named transformer.

Pure functions over state dicts; the loader reads the files, then applies wan.diffusers_to_ours and
wan_vae.diffusers_vae_to_ours to what these return.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Format = Literal["diffusers", "original"]

# ---------------------------------------------------------------------------------------------------------------
# Transformer: original -> diffusers
# ---------------------------------------------------------------------------------------------------------------

_TABLE = "scale_shift_table"  # a bare parameter, not a module: no .weight / .bias leaf
# Original module path -> diffusers, outside the blocks and inside one (without "blocks.N.").
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": _TABLE,
}
_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
_BLOCK = {
    **{f"self_attn.{a}": f"attn1.{b}" for a, b in _ATTENTION.items()},
    **{f"cross_attn.{a}": f"attn2.{b}" for a, b in _ATTENTION.items()},
    "norm3": "norm2",  # the affine cross-attention norm; the other two norms have no weights in either layout
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": _TABLE,
}
_BLOCK_PATH = re.compile(r"blocks\.(\d+)\.(.+)")
# Leading prefixes seen in the wild: ComfyUI (model.)diffusion_model., diffusers LoRAs transformer., PEFT base_model.model.
_PREFIX = re.compile(r"(?:transformer\.|base_model\.model\.|model\.)?(?:diffusion_model\.)?")
_ORIGINAL_MARK = re.compile(
    r"(?:^|\.)(?:self_attn|cross_attn|ffn\.[02]|text_embedding|time_embedding|time_projection|head\.head|modulation)(?:\.|$)"
)
_DIFFUSERS_MARK = re.compile(r"(?:^|\.)(?:attn1|attn2|condition_embedder|proj_out|scale_shift_table|ffn\.net)(?:\.|$)")
_I2V_MARKS = ("img_emb", "k_img", "v_img", "add_k_proj", "add_v_proj", "norm_added_k", "image_embedder")


def _lookup(path: str, top: Mapping[str, str], block: Mapping[str, str]) -> str | None:
    """A module path renamed by a top-level table and a per-block table, or None when neither knows it."""
    if match := _BLOCK_PATH.fullmatch(path):
        local = block.get(match[2])
        return None if local is None else f"blocks.{match[1]}.{local}"
    return top.get(path)


def _check_supported(key: str, what: str) -> None:
    if any(mark in key for mark in _I2V_MARKS):
        raise ValueError(f"{what} key {key!r} belongs to an image-to-video Wan model; only text-to-video is supported")
    if "vace_" in key:
        raise ValueError(f"{what} key {key!r} belongs to a Wan VACE model (control blocks); VACE is not supported")


def _naming(keys: Iterable[str], what: str, original: re.Pattern[str], diffusers: re.Pattern[str]) -> Format:
    keys = list(keys)
    is_original = any(original.search(k) for k in keys)
    is_diffusers = any(diffusers.search(k) for k in keys)
    if is_original and is_diffusers:
        raise ValueError(f"{what} mixes original Wan and diffusers key names")
    if not (is_original or is_diffusers):
        raise ValueError(f"{what} has neither original Wan nor diffusers key names (first keys: {keys[:3]})")
    return "original" if is_original else "diffusers"


def detect_format(keys: Iterable[str]) -> Format:
    """Whether a Wan transformer state dict uses diffusers' names or the original Wan repo's."""
    return _naming(keys, "Wan transformer state dict", _ORIGINAL_MARK, _DIFFUSERS_MARK)


def _original_key(key: str) -> str:
    _check_supported(key, "transformer")
    name = _PREFIX.sub("", key, count=1)
    target = _lookup(name, _TOP, _BLOCK)
    if target is not None and target.endswith(_TABLE):
        return target
    module, _, leaf = name.rpartition(".")
    target = _lookup(module, _TOP, _BLOCK)
    if target is None or leaf not in ("weight", "bias"):
        raise ValueError(f"unknown key {key!r} in an original-format Wan2.1 transformer checkpoint")
    return f"{target}.{leaf}"


def original_to_diffusers_transformer(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original-format Wan2.1 T2V transformer (Wan-AI's WanModel, also lightx2v and ComfyUI files, with an
    optional `model.` / `diffusion_model.` prefix) to WanTransformer3DModel's names. Tensors are passed through;
    every key is renamed exactly once, and unknown, image-to-video and VACE keys raise ValueError."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = _original_key(key)
        if name in out:
            raise ValueError(f"two keys map to {name!r} (the same tensor under two prefixes?); the second is {key!r}")
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# VAE: original (Wan2.1_VAE.pth) -> diffusers AutoencoderKLWan
# ---------------------------------------------------------------------------------------------------------------

_VAE_TOP = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "decoder.head.0": "decoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.2": "decoder.conv_out",
}
# A block's parts: res block (Sequential of norm, SiLU, conv, norm, SiLU, dropout, conv), resample, mid attention.
_RES_BLOCK = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}
_RESAMPLE = {"resample.1": "resample.1", "time_conv": "time_conv"}
_MIDDLE = {
    0: ("resnets.0", _RES_BLOCK),
    1: ("attentions.0", {"norm": "norm", "to_qkv": "to_qkv", "proj": "proj"}),
    2: ("resnets.1", _RES_BLOCK),
}
_VAE_BLOCK = re.compile(r"(encoder\.middle|decoder\.middle|encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.+)")
_VAE_ORIGINAL_MARK = re.compile(r"^(?:encoder\.downsamples|decoder\.upsamples|(?:en|de)coder\.middle|conv[12])\.")
_VAE_DIFFUSERS_MARK = re.compile(r"^(?:encoder\.down_blocks|decoder\.up_blocks|(?:en|de)coder\.mid_block|quant_conv)\.")


def detect_vae_format(keys: Iterable[str]) -> Format:
    """Whether a Wan2.1 VAE state dict uses diffusers' AutoencoderKLWan names or the original Wan2.1_VAE.pth ones."""
    return _naming(keys, "Wan VAE state dict", _VAE_ORIGINAL_MARK, _VAE_DIFFUSERS_MARK)


def _vae_module(module: str, num_res_blocks: int) -> str | None:
    """An original VAE module path -> diffusers'. The encoder's flat list (per stage num_res_blocks res blocks, then
    a resample but in the last stage) stays flat; the decoder's (num_res_blocks + 1 res blocks, then an upsampler)
    becomes up_blocks.S.{resnets.J, upsamplers.0}."""
    if module in _VAE_TOP:
        return _VAE_TOP[module]
    if not (match := _VAE_BLOCK.fullmatch(module)):
        return None
    group, index, part = match[1], int(match[2]), match[3]
    coder = group.partition(".")[0]
    if group.endswith("middle"):
        if index not in _MIDDLE:
            return None
        block, parts = _MIDDLE[index]
        block = f"mid_block.{block}"
    elif group == "encoder.downsamples":
        block, parts = f"down_blocks.{index}", {**_RES_BLOCK, **_RESAMPLE}
    else:
        stage, j = divmod(index, num_res_blocks + 2)
        upsampler = j == num_res_blocks + 1
        block = f"up_blocks.{stage}.upsamplers.0" if upsampler else f"up_blocks.{stage}.resnets.{j}"
        parts = _RESAMPLE if upsampler else _RES_BLOCK
    return f"{coder}.{block}.{parts[part]}" if part in parts else None


def original_to_diffusers_vae(state_dict: Mapping[str, Tensor], num_res_blocks: int = 2) -> dict[str, Tensor]:
    """Rename an original Wan2.1 VAE state dict (Wan2.1_VAE.pth's WanVAE_) to AutoencoderKLWan's names.
    `num_res_blocks` is the encoder's per-stage count (diffusers' config value; the decoder has one more)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        target = _vae_module(module, num_res_blocks)
        if target is None or leaf not in ("gamma", "weight", "bias"):
            raise ValueError(f"unknown key {key!r} in an original-format Wan2.1 VAE checkpoint")
        name = f"{target}.{leaf}"
        if name in out:
            raise ValueError(f"two keys map to {name!r}; the second is {key!r}")
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPair:
    """One LoRA's change to one weight: up @ down, times alpha / rank unless alpha is None or 0 (kohya's convention);
    and/or full deltas of the weight (`diff`) and of the bias beside it (`diff_b`). All of it is multiplied by the
    LoRA's strength when merged."""

    down: Tensor | None = None  # (r, in)
    up: Tensor | None = None  # (out, r)
    alpha: float | None = None
    diff: Tensor | None = None  # shaped as the weight
    diff_b: Tensor | None = None  # shaped as the bias


_LORA_KEY = re.compile(
    r"(.+)\.(lora_down\.weight|lora_A\.weight|lora_up\.weight|lora_B\.weight|lora_B\.bias|alpha|diff|diff_b|diff_m)"
)
_LORA_FIELD = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "lora_B.bias": "diff_b",  # PEFT's lora_bias, which diffusers also writes for a `.diff_b`
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    "diff_m": "diff",  # lightx2v's delta of a `modulation` table, keyed by the module that holds it
}
_KOHYA_PREFIX = "lora_unet_"  # kohya / musubi-tuner: the original module path with dots as underscores
_KOHYA_TOP = {k.replace(".", "_"): k for k in _TOP}
_KOHYA_BLOCK = {k.replace(".", "_"): k for k in _BLOCK}
_DIFFUSERS_TOP = {v: v for v in _TOP.values()}
_DIFFUSERS_BLOCK = {v: v for v in _BLOCK.values()}


def _lora_module(key: str, path: str) -> str:
    """A LoRA key's module path without its file prefix; kohya names become original module paths."""
    if not path.startswith(_KOHYA_PREFIX):
        return _PREFIX.sub("", path, count=1)
    name = re.sub(r"^blocks_(\d+)_", r"blocks.\1.", path.removeprefix(_KOHYA_PREFIX))
    module = _lookup(name, _KOHYA_TOP, _KOHYA_BLOCK)
    if module is None:
        raise ValueError(f"LoRA key {key!r} names no Wan2.1 T2V transformer module")
    return module


def _lora_pair(module: str, fields: dict[str, Tensor]) -> LoraPair:
    down, up, alpha = fields.get("down"), fields.get("up"), fields.get("alpha")
    if (down is None) != (up is None):
        raise ValueError(f"LoRA for {module!r} has only one of its down/up (lora_A/lora_B) matrices")
    if alpha is not None and down is None:
        raise ValueError(f"LoRA for {module!r} has an alpha but no down/up matrices")
    if down is not None and up.shape[1] != down.shape[0]:
        raise ValueError(f"LoRA for {module!r}: up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
    return LoraPair(down, up, None if alpha is None else float(alpha), fields.get("diff"), fields.get("diff_b"))


def lora_to_diffusers(lora: Mapping[str, Tensor]) -> dict[str, LoraPair]:
    """A Wan2.1 T2V LoRA state dict by the diffusers transformer weight each entry changes (`blocks.0.attn1.to_q.weight`,
    or `blocks.0.scale_shift_table` for a table's `.diff`).

    Layouts: diffusers/PEFT (`transformer.<diffusers path>.lora_A/lora_B.weight`, `lora_B.bias`), original names
    (`diffusion_model.<original path>.lora_down/lora_up.weight` or `lora_A/lora_B`, `.alpha`, `.diff`, `.diff_b`,
    `blocks.N.diff_m` / `head.diff_m` for the modulation tables) and
    kohya/musubi (`lora_unet_<original path with underscores>.lora_down/lora_up.weight`, `.alpha`). Unknown keys and
    image-to-video or VACE keys raise ValueError. Alpha is only what the file carries as tensors: PEFT files keep
    theirs in metadata, which this does not read."""
    fields: dict[str, dict[str, Tensor]] = {}
    for key, value in lora.items():
        _check_supported(key, "LoRA")
        if not (match := _LORA_KEY.fullmatch(key)):
            raise ValueError(
                f"unknown LoRA key {key!r}: expected lora_down/up or lora_A/B weights, alpha, diff, diff_b"
            )
        module = _lora_module(key, f"{match[1]}.modulation" if match[2] == "diff_m" else match[1])
        slot = fields.setdefault(module, {})
        field = _LORA_FIELD[match[2]]
        if field in slot:
            raise ValueError(f"LoRA key {key!r} repeats the {field} of {module!r}")
        slot[field] = value
    naming = _naming(fields, "Wan LoRA", _ORIGINAL_MARK, _DIFFUSERS_MARK)
    tables = (_TOP, _BLOCK) if naming == "original" else (_DIFFUSERS_TOP, _DIFFUSERS_BLOCK)
    out: dict[str, LoraPair] = {}
    for module, slot in fields.items():
        target = _lookup(module, *tables)
        if target is None:
            raise ValueError(f"LoRA module {module!r} is not a Wan2.1 T2V transformer module")
        name = target if target.endswith(_TABLE) else f"{target}.weight"
        if name in out:
            raise ValueError(f"two LoRA modules change {name!r}; the second is {module!r}")
        out[name] = _lora_pair(module, slot)
    return out


def _lora_terms(pair: LoraPair, name: str, weight: Tensor) -> list[Tensor]:
    """The fp32 deltas `pair` adds to `weight` (named `name`) at strength 1, each shaped as `weight`; diff_b is
    not among them (merge_loras files it under the bias as a pair of its own)."""
    f32 = {"device": weight.device, "dtype": torch.float32}
    terms = [] if pair.diff is None else [pair.diff.to(**f32)]
    if pair.down is not None:
        factor = pair.alpha / pair.down.shape[0] if pair.alpha else 1.0
        terms.append(factor * (pair.up.flatten(1).to(**f32) @ pair.down.flatten(1).to(**f32)))  # (out, in)
    for term in terms:
        if term.shape != weight.shape:
            raise ValueError(
                f"LoRA delta for {name!r} has shape {tuple(term.shape)}; the tensor is {tuple(weight.shape)}"
            )
    return terms


def merge_loras(
    state_dict: Mapping[str, Tensor], loras: Sequence[tuple[Mapping[str, Tensor], float]]
) -> dict[str, Tensor]:
    """A diffusers-named Wan transformer state dict with LoRAs merged: W += strength * (alpha / rank or 1) * up @ down
    (plus strength * diff), bias += strength * diff_b. Each changed tensor is computed in fp32 over all LoRAs, then
    cast back to its dtype; the others are passed through, and the input is not modified. LoRAs are raw state dicts
    in any layout `lora_to_diffusers` reads; one that changes a tensor `state_dict` lacks raises ValueError."""
    changes: dict[str, list[tuple[LoraPair, float]]] = {}  # tensor name -> (change, strength) per LoRA
    for lora, strength in loras:
        for name, pair in lora_to_diffusers(lora).items():
            if pair.down is not None or pair.diff is not None:
                changes.setdefault(name, []).append((pair, strength))
            if pair.diff_b is not None:
                bias = f"{name.removesuffix('.weight')}.bias"
                changes.setdefault(bias, []).append((LoraPair(diff=pair.diff_b), strength))
    if missing := sorted(set(changes) - set(state_dict)):
        raise ValueError(f"LoRA changes tensors the transformer does not have: {missing[:8]} ({len(missing)} in all)")
    out = dict(state_dict)
    for name, items in changes.items():  # one tensor at a time: a 14B model's deltas never exist all at once
        merged = state_dict[name].to(torch.float32, copy=True)
        for pair, strength in items:
            for term in _lora_terms(pair, name, merged):
                merged.add_(term, alpha=strength)
        out[name] = merged.to(state_dict[name].dtype)
    return out
