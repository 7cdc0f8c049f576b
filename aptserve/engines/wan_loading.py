"""Wan2.1 checkpoints as they are published, loaded onto our WanTransformer and Wan-layout CausalVAE.

Sources, in the order `load_wan` reads them:
- a diffusers pipeline folder (`model_index.json` naming WanPipeline; transformer/ and vae/ hold config.json and
  safetensors, sharded with an index or not; text_encoder/ and tokenizer/ hold UMT5 for transformers);
- optional overrides, in the folder's own `aptserve.json` or in a JSON file passed instead of the folder (it names
  the folder as `base`): other transformer or VAE weights (a few-step distilled checkpoint, in diffusers or the
  original Wan key format), LoRAs merged at load time, and the sampling settings a checkpoint needs (its sigma list,
  guidance, sizes, fps), which a diffusers folder does not carry.

Tensors go through explicit key maps (wan_formats, wan.diffusers_to_ours, wan_vae.diffusers_vae_to_ours) onto
modules built on the meta device, so every tensor is used exactly once and a 14B model never exists twice. What we
cannot serve (image-to-video, VACE, Wan2.2's 5B and two-expert models) is refused with an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from aptserve.engines import wan_formats
from aptserve.engines.config import ModelConfig, tuples
from aptserve.engines.loading import CheckpointError, LoadedModel, assign_weights
from aptserve.engines.text import TextEncoderConfig
from aptserve.engines.vae import VAE_PRESETS, CausalVAE, VAEConfig
from aptserve.engines.wan import WanConfig, WanTransformer, diffusers_to_ours
from aptserve.engines.wan_vae import diffusers_vae_to_ours

MODEL_INDEX = "model_index.json"
SPEC_NAME = "aptserve.json"
# Wan2.1's own default negative prompt (its shared_config.sample_neg_prompt), used for guided sampling.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)
WAN_SIZES = ((832, 480), (480, 832), (1280, 720), (720, 1280))  # (W, H): Wan2.1's 480p and 720p, both orientations
# A base checkpoint's sampling: 50 steps with guidance 5 (Wan uses UniPC; we integrate the same flow with Euler).
BASE_SAMPLING = {"default_steps": 50, "guidance_scale": 5.0}
SAMPLING_KEYS = (
    "default_size",
    "sizes",
    "fps",
    "default_steps",
    "guidance_scale",
    "negative_prompt",
    "sample_shift",
    "sample_sigmas",
    "two_step_t",
)
SPEC_KEYS = ("base", "name", "transformer", "vae", "loras", *SAMPLING_KEYS)
# Pipelines built on Wan2.1's blocks that need inputs or modules we do not have, by diffusers class name.
UNSUPPORTED_PIPELINES = {
    "WanImageToVideoPipeline": "image-to-video (an image encoder and image cross-attention)",
    "WanVACEPipeline": "VACE (control and editing blocks)",
    "WanVideoToVideoPipeline": "video-to-video",
    "WanAnimatePipeline": "Wan-Animate",
}
# Tensors read in fp32 whatever the load dtype (cast again when assigned): modulation tables, time embedding, norms.
_KEEP_FP32_NAMES = ("time_embed", "scale_shift_table", "modulation", "norm")


def is_wan_source(path: str | os.PathLike) -> bool:
    """A diffusers Wan folder (it has model_index.json) or an override spec file (*.json)."""
    path = Path(path)
    return (path / MODEL_INDEX).is_file() if path.is_dir() else path.suffix == ".json" and path.is_file()


def load_wan(
    source: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """A Wan2.1 folder or override spec as a LoadedModel (config, generator, VAE), weights in `dtype`
    except the parameters WanTransformer keeps in fp32."""
    spec = read_spec(source)
    folder = Path(spec["base"])
    config = wan_config(folder, spec, dtype)
    where = f"Wan checkpoint {source}"

    transformer = read_tensors(Path(spec.get("transformer") or folder / "transformer"), dtype, where)
    loras = [(read_tensors(Path(lora["path"]), None, where), float(lora.get("scale", 1.0))) for lora in spec["loras"]]
    vae = read_tensors(Path(spec.get("vae") or folder / "vae"), torch.float32, where)
    with torch.device("meta"):
        dit, decoder = WanTransformer(config.dit), CausalVAE(config.vae)
    try:  # every format and key-map problem names the tensor; say which checkpoint it came from
        if wan_formats.detect_format(transformer) == "original":
            transformer = wan_formats.original_to_diffusers_transformer(transformer)
        if loras:
            transformer = wan_formats.merge_loras(transformer, loras)
        if wan_formats.detect_vae_format(vae) == "original":
            vae = wan_formats.original_to_diffusers_vae(vae, config.vae.num_res_blocks)
        ours = {"dit": diffusers_to_ours(transformer), "vae": diffusers_vae_to_ours(vae, config.vae)}
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    del transformer, vae, loras
    assign_weights(dit, ours["dit"], f"{where} (transformer)", dtype)
    assign_weights(decoder, ours["vae"], f"{where} (vae)", dtype)
    return LoadedModel(config, dit.to(device).eval(), decoder.to(device).eval(), str(source))


# ---------------------------------------------------------------------------------------------------------------
# Configs: diffusers' config.json files and our overrides -> ModelConfig
# ---------------------------------------------------------------------------------------------------------------


def read_wan_config(source: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ModelConfig:
    """The ModelConfig `load_wan` would build, without reading any weights."""
    spec = read_spec(source)
    return wan_config(Path(spec["base"]), spec, dtype)


def read_spec(source: str | os.PathLike) -> dict[str, Any]:
    """The overrides for a Wan folder, with `base` (the folder) and `loras` (a list) always set. Relative paths
    in a spec are relative to the spec file."""
    source = Path(source)
    file = source / SPEC_NAME if source.is_dir() else source
    spec: dict[str, Any] = {}
    if file.is_file():
        try:
            spec = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file}: not JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise CheckpointError(f"{file}: must hold a JSON object")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise CheckpointError(f"{file}: unknown keys {unknown}; allowed: {list(SPEC_KEYS)}")
    if source.is_dir():
        spec["base"] = str(source)
    elif "base" not in spec:
        raise CheckpointError(f"{file}: needs `base`, the Wan2.1 diffusers folder it applies to")
    for key in ("base", "transformer", "vae"):
        if key in spec:
            spec[key] = str(file.parent / spec[key])
    loras = spec.get("loras", [])
    if not isinstance(loras, list) or not all(isinstance(x, dict) and "path" in x for x in loras):
        raise CheckpointError(f'{file}: `loras` must be a list of {{"path": ..., "scale": ...}} objects')
    spec["loras"] = [{**lora, "path": str(file.parent / lora["path"])} for lora in loras]
    return spec


def read_json(file: Path, where: str) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{where}: {file} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: {file} is not JSON: {exc}") from exc


def check_pipeline(folder: Path) -> None:
    """model_index.json must describe a Wan2.1 text-to-video pipeline we can serve."""
    index = read_json(folder / MODEL_INDEX, str(folder))
    name = index.get("_class_name")
    if name in UNSUPPORTED_PIPELINES:
        raise CheckpointError(f"{folder}: {name} is {UNSUPPORTED_PIPELINES[name]}, which aptserve does not serve")
    if "transformer_2" in index and index["transformer_2"] not in (None, [None, None]):
        raise CheckpointError(
            f"{folder}: a two-expert (Wan2.2 A14B) pipeline with transformer_2 is not supported; "
            "only single-transformer Wan2.1 text-to-video"
        )
    if name != "WanPipeline":
        raise CheckpointError(f"{folder}: model_index.json names {name!r}; expected WanPipeline (Wan2.1 T2V)")


def transformer_config(folder: Path) -> WanConfig:
    where = str(folder / "transformer")
    raw = read_json(folder / "transformer" / "config.json", where)
    if raw.get("_class_name") != "WanTransformer3DModel":
        raise CheckpointError(f"{where}: {raw.get('_class_name')!r} is not a WanTransformer3DModel")
    if raw.get("image_dim") or raw.get("added_kv_proj_dim") or raw.get("pos_embed_seq_len"):
        raise CheckpointError(f"{where}: image conditioning (image_dim / added_kv_proj_dim) means image-to-video")
    if raw.get("in_channels", 16) != 16:
        hint = "Wan2.2 TI2V 5B" if raw.get("in_channels") == 48 else "image-to-video"
        raise CheckpointError(f"{where}: in_channels {raw['in_channels']} ({hint}); only 16-channel Wan2.1 T2V")
    if raw.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or not raw.get("cross_attn_norm", True):
        raise CheckpointError(f"{where}: qk_norm / cross_attn_norm differ from Wan2.1's; not supported")
    try:
        return WanConfig(
            depth=raw["num_layers"],
            hidden_size=raw["num_attention_heads"] * raw["attention_head_dim"],
            num_heads=raw["num_attention_heads"],
            ffn_dim=raw["ffn_dim"],
            in_channels=raw.get("in_channels", 16),
            out_channels=raw.get("out_channels") or raw.get("in_channels", 16),
            patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
            text_dim=raw.get("text_dim", 4096),
            freq_dim=raw.get("freq_dim", 256),
            eps=raw.get("eps", 1e-6),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad config.json: {exc!r}") from exc


def vae_config(folder: Path) -> VAEConfig:
    where = str(folder / "vae")
    raw = read_json(folder / "vae" / "config.json", where)
    if raw.get("_class_name") != "AutoencoderKLWan":
        raise CheckpointError(f"{where}: {raw.get('_class_name')!r} is not an AutoencoderKLWan")
    if raw.get("z_dim", 16) != 16 or raw.get("is_residual") or raw.get("patch_size"):
        raise CheckpointError(f"{where}: the Wan2.2 VAE (z_dim 48, patchified) is not supported; only Wan2.1's")
    if list(raw.get("temperal_downsample", [False, True, True])) != [False, True, True] or raw.get("attn_scales"):
        raise CheckpointError(f"{where}: temporal downsampling or attention scales differ from Wan2.1's")
    if raw.get("decoder_base_dim") not in (None, raw.get("base_dim", 96)):
        raise CheckpointError(f"{where}: a decoder_base_dim unlike base_dim is not supported")
    try:
        return dataclasses.replace(
            VAE_PRESETS["wan2.1"],
            base_channels=raw.get("base_dim", 96),
            channel_mults=tuple(raw.get("dim_mult", (1, 2, 4, 4))),
            num_res_blocks=raw.get("num_res_blocks", 2),
            decoder_res_blocks=raw.get("num_res_blocks", 2) + 1,
            latent_mean=tuple(raw["latents_mean"]),
            latent_std=tuple(raw["latents_std"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad config.json: {exc!r}") from exc


def text_config(folder: Path, dit: WanConfig, dtype: torch.dtype) -> TextEncoderConfig:
    raw = read_json(folder / "text_encoder" / "config.json", str(folder / "text_encoder"))
    if raw.get("model_type") != "umt5":
        raise CheckpointError(f"{folder / 'text_encoder'}: model_type {raw.get('model_type')!r}; expected umt5")
    tokenizer = folder / "tokenizer"
    return TextEncoderConfig(
        kind="umt5",
        dim=raw["d_model"],
        max_length=dit.text_len,
        path=str(folder / "text_encoder"),
        tokenizer_path=str(tokenizer) if tokenizer.is_dir() else None,
        dtype=str(dtype).removeprefix("torch."),
    )


def scheduler_shift(folder: Path) -> float:
    """The flow shift the folder's scheduler is configured with (UniPC's flow_shift, FlowMatchEuler's shift)."""
    file = folder / "scheduler" / "scheduler_config.json"
    raw = read_json(file, str(folder)) if file.is_file() else {}
    return float(raw.get("flow_shift") or raw.get("shift") or 3.0)  # 3.0: Wan2.1's 480p value


def wan_config(folder: Path, spec: dict[str, Any], dtype: torch.dtype) -> ModelConfig:
    """Our ModelConfig for a Wan folder: its components' configs, Wan2.1's serving defaults (16 fps, 480p and 720p,
    50 guided steps with its negative prompt), then the spec's sampling overrides."""
    check_pipeline(folder)
    dit = transformer_config(folder)
    sampling: dict[str, Any] = {"sizes": WAN_SIZES, "fps": 16, "negative_prompt": WAN_NEGATIVE_PROMPT}
    sampling |= {"sample_shift": scheduler_shift(folder), **BASE_SAMPLING}
    sampling |= {key: tuples(spec[key]) for key in SAMPLING_KEYS if key in spec}
    sampling.setdefault("default_size", sampling["sizes"][0] if sampling["sizes"] else WAN_SIZES[0])
    if spec.get("sample_sigmas"):  # a few-step checkpoint: its own step count, no guidance unless it says so
        sampling["default_steps"] = spec.get("default_steps", len(spec["sample_sigmas"]))
        sampling["guidance_scale"] = spec.get("guidance_scale", 1.0)
    try:
        return ModelConfig(
            name=spec.get("name") or folder.name,
            arch="wan2.1",
            dit=dit,
            vae=vae_config(folder),
            text=text_config(folder, dit, dtype),
            **sampling,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"Wan checkpoint {folder}: bad sampling settings: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# Tensors: safetensors (one file, a folder, a sharded index) or a .pth state dict
# ---------------------------------------------------------------------------------------------------------------


def weight_files(path: Path, where: str) -> list[Path]:
    """The files holding a component's tensors: the file itself, the shards its index lists, or every
    safetensors file in the folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{where}: {path} does not exist")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{where}: {path} holds several shard indexes {[i.name for i in indexes]}")
    if indexes:
        weight_map = read_json(indexes[0], where).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(f"{where}: shards listed in {indexes[0].name} are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth")) or sorted(path.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{where}: {path} holds no .safetensors or .pth weights")
    return files


def read_tensors(path: Path, dtype: torch.dtype | None, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a component by name, floats cast to `dtype` as read (None: as stored) except the names
    that stay fp32, so a checkpoint stored in fp32 is never held whole in fp32 when loading it in bf16."""
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor, file: Path) -> None:
        if key in tensors:
            raise CheckpointError(f"{where}: key {key!r} appears in more than one file ({file.name})")
        if dtype is not None and value.is_floating_point():
            value = value.to(torch.float32 if any(n in key for n in _KEEP_FP32_NAMES) else dtype)
        tensors[key] = value

    for file in weight_files(path, where):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        add(key, f.get_tensor(key), file)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for key, value in state.items():
                    add(key, value, file)
        except (OSError, RuntimeError, SafetensorError, AttributeError) as exc:
            raise CheckpointError(f"{where}: cannot read {file}: {exc}") from exc
    return tensors
