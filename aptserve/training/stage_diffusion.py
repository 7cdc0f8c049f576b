"""Stage 1: the flow-matching teacher. A text-conditioned generator (an MMDiT or Wan2.1 preset) trained on
precomputed VAE latents with classifier-free-guidance dropout; its EMA weights are exported with the VAE as a
many-step sampler."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aptserve.engines.config import GENERATORS, ModelConfig, build_generator
from aptserve.engines.dit import DIT_PRESETS, DiTConfig
from aptserve.engines.loading import load_components, load_text_encoder, save_checkpoint, storage_dtype
from aptserve.engines.sampling import add_noise, shift
from aptserve.engines.text import TextEncoderConfig
from aptserve.engines.vae import CausalVAE, VAEConfig
from aptserve.engines.wan import WAN_PRESETS, WanConfig
from aptserve.training.common import EMA, RunDir, Trainer, autocast, compute_dtype, seed_everything
from aptserve.training.data import caption_grammar
from aptserve.training.latents import LatentSet, ensure_shorter_captions, precompute

log = logging.getLogger("aptserve.training.diffusion")


@dataclass(frozen=True)
class DiffusionStageConfig:
    out: str = "runs/teacher-tiny"
    export: str = "models/shapes-teacher-tiny"
    vae: str = "models/shapes-vae-tiny"  # checkpoint folder holding the trained VAE
    latents: str = "runs/latents-tiny.pt"  # created from `vae` on first use
    latent_clips: int = 6000
    latent_seed: int = 0
    # "vae": the VAE's own latent normalisation; "channel": each latent channel scaled to zero mean and unit std
    # over the encoded training clips (the statistics travel in the exported VAE config, so sampling decodes right);
    # "frames": the same, with each of the first `latent_first_frames` latent frames given its own statistics
    latent_norm: str = "vae"
    latent_first_frames: int = 3
    frames: int = 49
    height: int = 64
    width: int = 64
    dit: str = "tiny"  # generator preset: an MMDiT one (engines.dit.DIT_PRESETS) or a Wan2.1 one (WAN_PRESETS)
    # A teacher checkpoint folder to continue from (its DiT weights start the model and the EMA; the optimiser starts
    # fresh, with the warm-up): more training for a teacher whose run folder is gone. Its DiT config and latent
    # normalisation must be the ones this config trains, unless `init_other_normalisation`: then a teacher trained
    # in another latent normalisation starts the run and its weights adapt to this one.
    init: str | None = None
    init_other_normalisation: bool = False
    steps: int = 5000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 200
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    # fraction of samples captioned by a shorter caption of their clip (size, speed or background left out), so
    # short prompts such as "a red circle moving left" are in the training distribution
    shorter_captions: float = 0.0
    t_logit_mean: float = 0.0  # t = shift(sigmoid(N(mean, std)), t_shift): SD3's logit-normal, shifted to noise
    t_logit_std: float = 1.0
    t_shift: float = 1.0
    guidance_scale: float = 5.0  # written into the exported config for many-step sampling
    sample_steps: int = 25
    sample_shift: float = 3.0
    export_dtype: str = "float16"  # storage precision of the exported checkpoint (half the size of float32)
    compute_dtype: str = "float32"  # bfloat16: mixed-precision forward passes (AMX on the CPU), float32 weights
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25


def ensure_latents(
    path: str,
    vae_folder: str,
    clips: int,
    seed: int,
    frames: int,
    height: int,
    width: int,
    progress: bool = True,
    compute_dtype: str = "float32",
) -> LatentSet:
    """Load the precomputed latents, encoding them with the trained VAE first if they do not exist yet."""
    if Path(path).exists():
        return LatentSet.load(path)
    config, modules = load_components(vae_folder, ("vae",))
    encoder = load_text_encoder(config.text)
    latents = precompute(
        modules["vae"], encoder, clips, seed, frames, height, width, progress=progress, compute_dtype=compute_dtype
    )
    latents.save(path)
    return latents


LATENT_NORMS = ("vae", "channel", "frames")
GENERATOR_PRESETS = (*DIT_PRESETS, *WAN_PRESETS)


def generator_preset(name: str, text: TextEncoderConfig) -> tuple[str, DiTConfig | WanConfig]:
    """A generator preset's arch and shape: an MMDiT one as it is, a Wan2.1 one with its text input sized to the
    text encoder (it reads `max_length` tokens, zero-padded)."""
    if name in DIT_PRESETS:
        return "mmdit", DIT_PRESETS[name]
    if name in WAN_PRESETS:
        return "wan2.1", dataclasses.replace(WAN_PRESETS[name], text_dim=text.dim, text_len=text.max_length)
    raise ValueError(f"unknown generator preset {name!r}; choose one of {list(GENERATOR_PRESETS)}")


def latent_normalisation(latents: LatentSet, vae: VAEConfig, kind: str, first_frames: int = 3) -> VAEConfig:
    """The VAE config whose normalisation the generator is trained in."""
    if kind not in LATENT_NORMS:
        raise ValueError(f"unknown latent_norm {kind!r}; choose one of {LATENT_NORMS}")
    if kind == "vae":
        return vae
    mean, std, head_mean, head_std = latents.raw_statistics(first_frames if kind == "frames" else 0)
    log.info("per-channel latent mean %s", " ".join(f"{v:.3f}" for v in mean))
    log.info("per-channel latent std %s", " ".join(f"{v:.3f}" for v in std))
    for k, row in enumerate(head_std):
        log.info("latent frame %d: per-channel std %s", k, " ".join(f"{v:.3f}" for v in row))
    return dataclasses.replace(
        vae, latent_mean=mean, latent_std=std, first_frames_mean=head_mean, first_frames_std=head_std
    )


def sample_timesteps(n: int, cfg: DiffusionStageConfig) -> torch.Tensor:
    logits = torch.randn(n) * cfg.t_logit_std + cfg.t_logit_mean
    return shift(torch.sigmoid(logits), cfg.t_shift)


def drop_text(text: torch.Tensor, mask: torch.Tensor, latents: LatentSet, p: float) -> tuple[torch.Tensor, ...]:
    """Replace a fraction p of the prompts by the empty prompt, so the model also learns the unconditional field."""
    drop = torch.rand(text.shape[0]) < p
    empty_text, empty_mask = latents.empty_text(text.shape[0])
    return torch.where(drop[:, None, None], empty_text, text), torch.where(drop[:, None], empty_mask, mask)


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, t: torch.Tensor):
    eps = torch.randn_like(x0)
    v = model(add_noise(x0, eps, t), t, text, mask)
    return F.mse_loss(v, eps - x0)


def lr_at(step: int, cfg: DiffusionStageConfig) -> float:
    """Linear warm-up, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def load_init(model: nn.Module, folder: str, vae_config: VAEConfig, other_normalisation: bool = False) -> None:
    """Copy a teacher checkpoint's DiT weights into `model`, refusing one of another shape, and one trained in
    another latent space unless `other_normalisation` says the run is meant to move it there."""
    config, modules = load_components(folder, ("dit",))
    if config.dit != model.config:
        raise ValueError(f"init {folder}: its DiT config {config.dit} differs from this run's {model.config}")
    if config.vae.normalisation != vae_config.normalisation and not other_normalisation:
        raise ValueError(
            f"init {folder}: its latent normalisation differs from this run's (latent_norm, latents); "
            "set init_other_normalisation to train it into this one"
        )
    with torch.no_grad():
        for name, value in modules["dit"].state_dict().items():
            model.state_dict()[name].copy_(value)
    log.info("initialised from %s", folder)


def export_teacher(model: nn.Module, ema: EMA, cfg: DiffusionStageConfig, vae_config: VAEConfig) -> Path:
    base, modules = load_components(cfg.vae, ("vae",))
    vae = CausalVAE(vae_config)
    vae.load_state_dict(modules["vae"].state_dict())
    ema.copy_to(model)
    config: ModelConfig = dataclasses.replace(
        base,
        vae=vae_config,
        name=Path(cfg.export).name,
        arch=next(arch for arch, (_, cls) in GENERATORS.items() if isinstance(model, cls)),
        dit=model.config,
        default_steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
        sample_shift=cfg.sample_shift,
        default_size=(cfg.width, cfg.height),
        prompt_grammar=caption_grammar().to_dict(),  # trained on shapes captions; students inherit it
    )
    return save_checkpoint(cfg.export, config, {"dit": model, "vae": vae}, storage_dtype(cfg.export_dtype))


def train_diffusion(cfg: DiffusionStageConfig, progress: bool = True) -> Path:
    storage_dtype(cfg.export_dtype)  # bad names fail now, not at export or after the latents are encoded
    if cfg.latent_norm not in LATENT_NORMS:
        raise ValueError(f"unknown latent_norm {cfg.latent_norm!r}; choose one of {LATENT_NORMS}")
    if cfg.dit not in GENERATOR_PRESETS:
        raise ValueError(f"unknown generator preset {cfg.dit!r}; choose one of {list(GENERATOR_PRESETS)}")
    compute_dtype(cfg.compute_dtype)
    seed_everything(cfg.seed)
    latents = ensure_latents(
        cfg.latents,
        cfg.vae,
        cfg.latent_clips,
        cfg.latent_seed,
        cfg.frames,
        cfg.height,
        cfg.width,
        progress,
        cfg.compute_dtype,
    )
    vae_model_config = load_components(cfg.vae, ("vae",))[0]
    if cfg.shorter_captions > 0:
        latents = ensure_shorter_captions(latents, cfg.latents, vae_model_config.text)
    vae_config = latent_normalisation(latents, vae_model_config.vae, cfg.latent_norm, cfg.latent_first_frames)
    latents = latents.normalised_as(vae_config)
    arch, dit = generator_preset(cfg.dit, vae_model_config.text)
    model = build_generator(dataclasses.replace(vae_model_config, arch=arch, dit=dit))
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    if cfg.init is not None:
        load_init(model, cfg.init, vae_config, cfg.init_other_normalisation)
    ema = EMA(model, cfg.ema_decay, warmup=True)  # from random weights: no share of the init
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = RunDir(cfg.out)

    def get_state():
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}

    def set_state(state):
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])

    trainer = Trainer(
        run, cfg.steps, get_state, set_state, cfg.checkpoint_every, cfg.log_every, progress, "train diffusion"
    )
    trainer.resume()

    def step(i: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i, cfg)
        x0, text, mask = latents.batch(torch.randint(len(latents), (cfg.batch_size,)), cfg.shorter_captions)
        text, mask = drop_text(text, mask, latents, cfg.cfg_dropout)
        with autocast(cfg.compute_dtype):
            loss = flow_matching_loss(model, x0, text, mask, sample_timesteps(cfg.batch_size, cfg))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
        return {"loss": loss.item()}

    if trainer.fit(step) < cfg.steps:
        log.info("stopped at step %d; run the same command again to resume", trainer.step)
        return run.path
    return export_teacher(model, ema, cfg, vae_config)
