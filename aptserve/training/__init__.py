"""APT training recipe: data, diffusion pre-training, consistency distillation, adversarial post-training, and the
light decoder distilled from the VAE's."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# Each stage: its module, its config dataclass and its entry point (config, progress) -> result. Modules are
# imported only when a stage is asked for, so `import aptserve.training` stays light.
STAGES = {
    "vae": ("aptserve.training.stage_vae", "VAEStageConfig", "train_vae"),
    "diffusion": ("aptserve.training.stage_diffusion", "DiffusionStageConfig", "train_diffusion"),
    "distill": ("aptserve.training.stage_distill", "DistillStageConfig", "train_distill"),
    "apt": ("aptserve.training.stage_apt", "APTStageConfig", "train_apt"),
    "decoder": ("aptserve.training.stage_decoder", "DecoderStageConfig", "train_decoder"),
}


def stage(name: str) -> tuple[type, Callable[..., Any]]:
    """The config class and entry point of one stage."""
    if name not in STAGES:
        raise ValueError(f"unknown training stage {name!r}; choose one of {sorted(STAGES)}")
    module_name, config_name, entry = STAGES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, entry)
