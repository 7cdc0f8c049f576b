"""Stage 0: train the causal 3D VAE on short shapes clips (it is causal and convolutional, so it generalises to
49-frame clips), then measure the latent statistics the diffusion stages normalise by, and export."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from aptserve.engines.config import MODEL_PRESETS
from aptserve.engines.loading import load_components, save_checkpoint
from aptserve.engines.vae import VAE_PRESETS, CausalVAE
from aptserve.training.common import RunDir, Trainer, infinite, seed_everything
from aptserve.training.data import ShapesDataset

log = logging.getLogger("aptserve.training.vae")


@dataclass(frozen=True)
class VAEStageConfig:
    out: str = "runs/vae"
    export: str = "models/shapes-vae-tiny"
    preset: str = "tiny"  # VAE preset to train
    init: str | None = None  # a checkpoint folder to continue from (e.g. the shipped VAE) instead of scratch
    model: str = "tiny"  # model preset whose generator config the exported folder carries
    steps: int = 4000
    batch_size: int = 8
    frames: int = 9
    height: int = 64
    width: int = 64
    crop: int = 32  # train on random crops: the VAE is convolutional, and a 32x32 crop costs a quarter
    lr: float = 3e-4
    kl_weight: float = 1e-6
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    stats_clips: int = 64  # 49-frame clips for the latent mean/std and the reconstruction check


def random_crop(video: torch.Tensor, size: int) -> torch.Tensor:
    """One random spatial crop per clip of (B, C, F, H, W); the same crop across its frames."""
    b, _, _, h, w = video.shape
    if size >= min(h, w):
        return video
    ys, xs = torch.randint(0, h - size + 1, (b,)).tolist(), torch.randint(0, w - size + 1, (b,)).tolist()
    return torch.stack([clip[:, :, y : y + size, x : x + size] for clip, y, x in zip(video, ys, xs)])


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1)), averaged over elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def vae_losses(vae: CausalVAE, video: torch.Tensor, kl_weight: float) -> dict[str, torch.Tensor]:
    mean, logvar = vae.encode_distribution(video)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
    recon = vae.decode((z - vae.config.latent_mean) / vae.config.latent_std)
    l1, mse, kl = F.l1_loss(recon, video), F.mse_loss(recon, video), kl_divergence(mean, logvar)
    return {"loss": l1 + mse + kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}


@torch.no_grad()
def latent_statistics(vae: CausalVAE, cfg: VAEStageConfig) -> tuple[float, float, float]:
    """(mean, std) of raw posterior means over 49-frame clips, and the reconstruction PSNR in dB."""
    data = iter(ShapesDataset(seed=cfg.seed + 1, frames=49, height=cfg.height, width=cfg.width))
    means, mses = [], []
    for _ in range(cfg.stats_clips):
        video = next(data)[0][None]  # (1, 3, 49, H, W)
        mean, _ = vae.encode_distribution(video)
        means.append(mean.flatten())
        recon = vae.decode((mean - vae.config.latent_mean) / vae.config.latent_std).clamp(-1, 1)
        mses.append(F.mse_loss(recon, video).item())
    flat = torch.cat(means)
    psnr = 10 * torch.log10(torch.tensor(4.0) / torch.tensor(mses).mean()).item()  # range [-1, 1] -> peak 2
    return flat.mean().item(), flat.std().item(), psnr


def export(vae: CausalVAE, cfg: VAEStageConfig) -> Path:
    vae.eval()
    mean, std, psnr = latent_statistics(vae, cfg)
    log.info("latent mean %.4f std %.4f; reconstruction PSNR %.2f dB on %d clips", mean, std, psnr, cfg.stats_clips)
    vae_config = dataclasses.replace(vae.config, latent_mean=round(mean, 6), latent_std=round(std, 6))
    base = MODEL_PRESETS[cfg.model]
    config = dataclasses.replace(base, name=Path(cfg.export).name, vae=vae_config, default_size=(cfg.width, cfg.height))
    exported = CausalVAE(vae_config)
    exported.load_state_dict(vae.state_dict())
    return save_checkpoint(cfg.export, config, {"vae": exported})


def initial_vae(cfg: VAEStageConfig) -> CausalVAE:
    if cfg.init is None:
        vae = CausalVAE(VAE_PRESETS[cfg.preset])
        vae.init_weights()
        return vae
    _, modules = load_components(cfg.init, ("vae",))
    # Training works on raw latents; the statistics are measured again at export.
    vae = CausalVAE(dataclasses.replace(modules["vae"].config, latent_mean=0.0, latent_std=1.0))
    vae.load_state_dict(modules["vae"].state_dict())
    return vae.train()


def train_vae(cfg: VAEStageConfig, progress: bool = True) -> Path:
    seed_everything(cfg.seed)
    vae = initial_vae(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = RunDir(cfg.out)

    def get_state():
        return {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg)}

    def set_state(state):
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])

    trainer = Trainer(run, cfg.steps, get_state, set_state, cfg.checkpoint_every, cfg.log_every, progress, "train vae")
    start = trainer.resume()
    # The stream continues where the interrupted run stopped, so a resumed run sees the same data.
    data = ShapesDataset(cfg.seed, cfg.frames, cfg.height, cfg.width, start=start * cfg.batch_size)
    batches = infinite(DataLoader(data, batch_size=cfg.batch_size))

    def step(i: int) -> dict[str, float]:
        video = random_crop(next(batches)[0], cfg.crop)
        losses = vae_losses(vae, video, cfg.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {k: v.item() for k, v in losses.items()}

    if trainer.fit(step) < cfg.steps:
        log.info("stopped at step %d; run the same command again to resume", trainer.step)
        return run.path
    return export(vae, cfg)
