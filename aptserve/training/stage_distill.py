"""Stage 2: consistency distillation. A student initialised from the teacher learns the consistency function
f(x_t, t) = x_t - t * v(x_t, t) that maps any point of the teacher's guided ODE to its end; the teacher's CFG is
baked in, so the student needs one query at t = 1 and no guidance. Its output is blurry: it only initialises APT."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aptserve.engines.config import build_generator
from aptserve.engines.loading import load_components, save_checkpoint, storage_dtype
from aptserve.engines.sampling import add_noise, timesteps
from aptserve.training.common import EMA, RunDir, Trainer, seed_everything
from aptserve.training.latents import LatentSet, check_text_fits, ensure_shorter_captions

log = logging.getLogger("aptserve.training.distill")


@dataclass(frozen=True)
class DistillStageConfig:
    out: str = "runs/cd-tiny"
    export: str = "models/shapes-cd-tiny"
    teacher: str = "models/shapes-teacher-tiny"
    latents: str = "runs/latents-tiny.pt"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    guidance_scale: float | None = None  # None: the teacher's own; APT.md uses 7.5 at their scale
    num_timesteps: int = 32  # discretisation of the shifted schedule (APT2 used 32)
    schedule_shift: float = 3.0
    shorter_captions: float = 0.0  # fraction of samples with a shorter caption (teacher and student see the same)
    export_dtype: str = "float16"  # storage precision of the exported checkpoint (half the size of float32)
    target_ema: float = 0.0  # 0: the target is the student itself without gradient (APT2: no EMA target)
    ema_decay: float = 0.0  # > 0: export an EMA of the student (from the teacher's weights), not its last state
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25


def consistency(model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
    """f(x, t) = x - t * v(x, t): the clean-sample estimate; f(x, 0) = x by construction."""
    return x - t.view(-1, 1, 1, 1, 1) * model(x, t, text, mask)


@torch.no_grad()
def teacher_step(teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, text, mask, empty, scale):
    """One Euler step of the guided teacher ODE from t to t_prev."""
    v = teacher(x, t, text, mask)
    if scale != 1.0:
        v_uncond = teacher(x, t, *empty)
        v = v_uncond + scale * (v - v_uncond)
    return x + (t_prev - t).view(-1, 1, 1, 1, 1) * v


def distill_loss(student, target, teacher, latents: LatentSet, cfg: DistillStageConfig, scale: float, schedule):
    x0, text, mask = latents.batch(torch.randint(len(latents), (cfg.batch_size,)), cfg.shorter_captions)
    n = torch.randint(1, cfg.num_timesteps + 1, (cfg.batch_size,))
    t, t_prev = schedule[n], schedule[n - 1]  # t_prev < t; the largest t is exactly 1
    x_t = add_noise(x0, torch.randn_like(x0), t)
    x_prev = teacher_step(teacher, x_t, t, t_prev, text, mask, latents.empty_text(cfg.batch_size), scale)
    with torch.no_grad():
        goal = consistency(target, x_prev, t_prev, text, mask)
    return F.mse_loss(consistency(student, x_t, t, text, mask), goal)


def train_distill(cfg: DistillStageConfig, progress: bool = True) -> Path:
    storage_dtype(cfg.export_dtype)  # a bad name fails now, not at export
    seed_everything(cfg.seed)
    config, modules = load_components(cfg.teacher)
    teacher = modules["dit"].requires_grad_(False)
    scale = config.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    student = build_generator(config)  # the teacher's architecture, MMDiT or Wan2.1
    student.load_state_dict(teacher.state_dict())
    student.train()
    target = EMA(student, cfg.target_ema) if cfg.target_ema > 0 else None
    target_model = student if target is None else build_generator(config).requires_grad_(False)
    export_ema = EMA(student, cfg.ema_decay) if cfg.ema_decay > 0 else None
    latents = LatentSet.load(cfg.latents)
    if cfg.shorter_captions > 0:
        latents = ensure_shorter_captions(latents, cfg.latents, config.text)
    check_text_fits(latents, config, cfg.teacher)
    latents = latents.normalised_as(config.vae)  # the teacher's latent space
    schedule = timesteps(cfg.num_timesteps, cfg.schedule_shift).flip(0)  # increasing: 0 ... 1
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = RunDir(cfg.out)

    def get_state():
        return {
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "target": None if target is None else target.state_dict(),
            "ema": None if export_ema is None else export_ema.state_dict(),
        }

    def set_state(state):
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        if target is not None:
            target.load_state_dict(state["target"])
        if export_ema is not None:
            export_ema.load_state_dict(state["ema"])

    trainer = Trainer(
        run, cfg.steps, get_state, set_state, cfg.checkpoint_every, cfg.log_every, progress, "train distill"
    )
    trainer.resume()

    def step(i: int) -> dict[str, float]:
        if target is not None:
            target.copy_to(target_model)
        loss = distill_loss(student, target_model, teacher, latents, cfg, scale, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if target is not None:
            target.update(student)
        if export_ema is not None:
            export_ema.update(student)
        return {"loss": loss.item()}

    if trainer.fit(step) < cfg.steps:
        log.info("stopped at step %d; run the same command again to resume", trainer.step)
        return run.path
    if export_ema is not None:
        export_ema.copy_to(student)
    export = dataclasses.replace(config, name=Path(cfg.export).name, default_steps=1, guidance_scale=1.0)
    return save_checkpoint(cfg.export, export, {"dit": student, "vae": modules["vae"]}, storage_dtype(cfg.export_dtype))
