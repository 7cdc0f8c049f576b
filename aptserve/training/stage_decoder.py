"""Light-decoder distillation (APT2's cheaper decoder): a causal decoder with fewer channels learns to reproduce the
full VAE decoder's frames from the same latents, both real clips' latents and the ones the served generator makes.
The encoder and the latent normalisation are the teacher's, frozen; only the decoder trains.

The student trains on whole-clip decodes: its layers are the teacher's (causal convs, explicit cache), so its
streaming decode equals its whole decode (tests/engines/test_light_decoder.py checks the exported one)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from aptserve.engines.config import ModelConfig
from aptserve.engines.dit import MMDiT
from aptserve.engines.loading import load_components, save_checkpoint, storage_dtype
from aptserve.engines.sampling import one_step
from aptserve.engines.vae import CausalVAE
from aptserve.training.common import EMA, RunDir, Trainer, seed_everything
from aptserve.training.latents import LatentSet
from aptserve.training.stage_diffusion import ensure_latents

log = logging.getLogger("aptserve.training.decoder")


@dataclass(frozen=True)
class DecoderStageConfig:
    out: str = "runs/decoder-light-tiny"
    export: str = "models/shapes-decoder-light-tiny"
    teacher: str = "models/shapes-apt-tiny"  # its VAE decodes the targets; its generator makes the served latents
    latents: str = "runs/latents-decoder-tiny.pt"  # real clips' latents, encoded with the teacher's VAE on first use
    latent_clips: int = 384
    latent_seed: int = 0
    frames: int = 49  # clip size of the real latents; generated latents have the same shape
    height: int = 64
    width: int = 64
    decoder_base_channels: int = 8  # the student's decoder: base * (4, 4, 2, 1) channels per stage
    decoder_res_blocks: int = 1
    generated_fraction: float = 0.5  # share of each batch decoded from latents the teacher's generator makes
    steps: int = 1500
    batch_size: int = 2
    lr: float = 1e-3
    warmup: int = 50
    min_lr: float = 1e-4  # cosine decay from lr after the warm-up to this at the last step
    # loss = L1 + mse_weight * MSE + edge_weight * L1 of horizontal and vertical pixel differences. L1 alone spends
    # its gradient evenly over pixels, most of them flat background; MSE's grows with the error, so the small shapes
    # (colour, outline) the decoder gets wrong weigh more.
    mse_weight: float = 2.0
    edge_weight: float = 0.5
    ema_decay: float = 0.98  # the export is this EMA of the decoder (with warm-up: it starts from random weights)
    export_dtype: str = "float16"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 25

    def __post_init__(self) -> None:
        if not 0.0 <= self.generated_fraction <= 1.0:
            raise ValueError(f"generated_fraction must be in [0, 1]; got {self.generated_fraction}")
        if self.batch_size < 1 or self.steps < 0 or self.latent_clips < 1:
            raise ValueError(
                f"batch_size and latent_clips must be >= 1 and steps >= 0; got {self.batch_size}, "
                f"{self.latent_clips}, {self.steps}"
            )
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr; got min_lr {self.min_lr}, lr {self.lr}")


@dataclass
class DecoderParts:
    teacher: CausalVAE  # frozen
    generator: MMDiT  # frozen: makes the served latents
    student: CausalVAE  # the teacher's encoder and normalisation with a light decoder; only `student.decoder` trains
    ema: EMA
    optimizer: torch.optim.Optimizer
    model_config: ModelConfig  # the teacher checkpoint's

    def state_dict(self) -> dict:
        decoder, optimizer = self.student.decoder.state_dict(), self.optimizer.state_dict()
        return {"decoder": decoder, "ema": self.ema.state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        self.student.decoder.load_state_dict(state["decoder"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])


def light_student(teacher: CausalVAE, base_channels: int, res_blocks: int) -> CausalVAE:
    """A VAE with the teacher's config, encoder weights and latent normalisation, and a fresh lighter decoder."""
    config = dataclasses.replace(teacher.config, decoder_base_channels=base_channels, decoder_res_blocks=res_blocks)
    student = CausalVAE(config)
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    student.encoder.requires_grad_(False)
    return student


def build(cfg: DecoderStageConfig) -> DecoderParts:
    model_config, modules = load_components(cfg.teacher, ("dit", "vae"))
    teacher = modules["vae"].requires_grad_(False)
    generator = modules["dit"].requires_grad_(False)
    student = light_student(teacher, cfg.decoder_base_channels, cfg.decoder_res_blocks)
    student.train()
    ema = EMA(student.decoder, cfg.ema_decay, warmup=True)
    optimizer = torch.optim.AdamW(student.decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    log.info(
        "decoder parameters: teacher %d, student %d",
        sum(p.numel() for p in teacher.decoder.parameters()),
        sum(p.numel() for p in student.decoder.parameters()),
    )
    return DecoderParts(teacher.eval(), generator.eval(), student, ema, optimizer, model_config)


def real_latents(cfg: DecoderStageConfig, teacher: CausalVAE, progress: bool) -> LatentSet:
    """The training clips' latents in the teacher's normalisation (any cached set works: targets are the teacher's
    decode of whatever goes in)."""
    latents = ensure_latents(
        cfg.latents, cfg.teacher, cfg.latent_clips, cfg.latent_seed, cfg.frames, cfg.height, cfg.width, progress
    )
    return latents.normalised_as(teacher.config)


@torch.no_grad()
def latent_batch(parts: DecoderParts, latents: LatentSet, cfg: DecoderStageConfig) -> torch.Tensor:
    """(B, C, L, h, w): real clips' latents, and a share `generated_fraction` made by the generator in one step from
    fresh noise and the captions of random training clips (the distribution the server decodes)."""
    generated = round(cfg.batch_size * cfg.generated_fraction)
    real, text, mask = latents.batch(torch.randint(len(latents), (cfg.batch_size,)))
    if generated == 0:
        return real
    text, mask = text[:generated], mask[:generated]
    noise = torch.randn_like(real[:generated])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return parts.generator(x, t, text, mask)

    return torch.cat([real[generated:], one_step(velocity, noise)])


def pixel_differences(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical neighbour differences of (B, C, F, H, W): where edges are."""
    return video[..., :, 1:] - video[..., :, :-1], video[..., 1:, :] - video[..., :-1, :]


def decoder_losses(parts: DecoderParts, z: torch.Tensor, cfg: DecoderStageConfig) -> dict[str, torch.Tensor]:
    """Pixel losses to the teacher's frames as served (clamped to [-1, 1]): L1, MSE and the L1 of their pixel
    differences (see DecoderStageConfig); the PSNR (dB, peak 2 for the [-1, 1] range) is logged only."""
    with torch.no_grad():
        target = parts.teacher.decode(z).clamp(-1, 1)  # (B, 3, F, H, W)
    frames = parts.student.decode(z)
    l1, mse = F.l1_loss(frames, target), F.mse_loss(frames, target)
    edge = sum(F.l1_loss(a, b) for a, b in zip(pixel_differences(frames), pixel_differences(target)))
    with torch.no_grad():
        psnr = 10 * torch.log10(4.0 / F.mse_loss(frames.clamp(-1, 1), target).clamp_min(1e-10))
    loss = l1 + cfg.mse_weight * mse + cfg.edge_weight * edge
    return {"loss": loss, "l1": l1, "edge": edge, "psnr": psnr}


def lr_at(step: int, cfg: DecoderStageConfig) -> float:
    """Linear warm-up, then a cosine from lr to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def export(parts: DecoderParts, cfg: DecoderStageConfig) -> Path:
    """The student VAE (teacher encoder, EMA decoder) as a VAE-only checkpoint whose config is the teacher model's
    with the light VAE; a model names it in its `light_decoder`."""
    vae = CausalVAE(parts.student.config)
    vae.load_state_dict(parts.student.state_dict())
    parts.ema.copy_to(vae.decoder)
    config = dataclasses.replace(
        parts.model_config, name=Path(cfg.export).name, vae=parts.student.config, light_decoder=None
    )
    folder = save_checkpoint(cfg.export, config, {"vae": vae.eval()}, storage_dtype(cfg.export_dtype))
    size = sum(f.stat().st_size for f in folder.iterdir())
    log.info("exported the light decoder to %s (%.2f MB)", folder, size / 1e6)
    return folder


def train_decoder(cfg: DecoderStageConfig, progress: bool = True) -> Path:
    storage_dtype(cfg.export_dtype)  # a bad name fails now, not at export
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    parts = build(cfg)
    latents = real_latents(cfg, parts.teacher, progress)
    run = RunDir(cfg.out)

    def get_state() -> dict:
        return {**parts.state_dict(), "config": dataclasses.asdict(cfg)}

    def set_state(state: dict) -> None:
        parts.load_state_dict(state)
        parts.ema.decay = cfg.ema_decay  # the config's, also where a resumed run changes it

    trainer = Trainer(
        run, cfg.steps, get_state, set_state, cfg.checkpoint_every, cfg.log_every, progress, "train decoder"
    )
    trainer.resume()

    def step(i: int) -> dict[str, float]:
        for group in parts.optimizer.param_groups:
            group["lr"] = lr_at(i, cfg)
        losses = decoder_losses(parts, latent_batch(parts, latents, cfg), cfg)
        parts.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        parts.optimizer.step()
        parts.ema.update(parts.student.decoder)
        return {k: v.item() for k, v in losses.items()}

    if trainer.fit(step) < cfg.steps:
        log.info("stopped at step %d; run the same command again to resume", trainer.step)
        return run.path
    return export(parts, cfg)
