"""Precomputed training data for the diffusion stages: VAE latents of shapes clips plus text embeddings of their
captions, encoded once so every later step costs only the transformer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engines.text import TextEncoder
from engines.vae import CausalVAE, VAEConfig
from training.common import autocast
from training.data import ShapesDataset

log = logging.getLogger("aptserve.training.latents")


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, F, h, w) normalised VAE latents, float16 on disk
    caption_ids: torch.Tensor  # (N,) index into captions
    captions: list[str]
    text_tokens: torch.Tensor  # (U, L, D) one row per unique caption; row 0 is the empty prompt
    text_mask: torch.Tensor  # (U, L) bool
    # the normalisation `latents` are in: latents = (mu - latent_mean) / latent_std, per channel or scalar
    latent_mean: float | tuple[float, ...]
    latent_std: float | tuple[float, ...]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, text, mask) for these sample indices, in float32."""
        ids = self.caption_ids[indices]
        return self.latents[indices].float(), self.text_tokens[ids].float(), self.text_mask[ids]

    def empty_text(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embedding, for classifier-free guidance and its dropout."""
        return self.text_tokens[:1].float().expand(n, -1, -1), self.text_mask[:1].expand(n, -1)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.__dict__, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> LatentSet:
        fields = torch.load(path, map_location="cpu", weights_only=False)
        if "latent_std" not in fields:
            raise ValueError(f"{path} does not record its latent normalisation; delete it to encode it again")
        return cls(**fields)

    def raw_channel_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the unnormalised latents (over clips, frames and positions)."""
        mean, std = _as_tensor(self.latent_mean), _as_tensor(self.latent_std)
        sums = torch.zeros(self.latents.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(sums)
        for chunk in self.latents.split(512):
            raw = chunk.double() * std + mean
            sums += raw.sum(dim=(0, 2, 3, 4))
            squares += raw.square().sum(dim=(0, 2, 3, 4))
        count = self.latents.numel() // self.latents.shape[1]
        means = sums / count
        stds = (squares / count - means.square()).clamp_min(0).sqrt()
        return tuple(round(v, 6) for v in means.tolist()), tuple(round(v, 6) for v in stds.tolist())

    def normalised_as(self, vae: VAEConfig) -> LatentSet:
        """The same set in `vae`'s latent normalisation (a generator trained on it sees what its VAE encodes)."""
        if (vae.latent_mean, vae.latent_std) == (self.latent_mean, self.latent_std):
            return self
        old = (self.latent_mean, self.latent_std)
        new = (vae.latent_mean, vae.latent_std)
        latents = torch.cat([renormalise(chunk, old, new) for chunk in self.latents.split(512)])
        fields = {**self.__dict__, "latents": latents, "latent_mean": vae.latent_mean, "latent_std": vae.latent_std}
        return LatentSet(**fields)


Statistics = tuple[float | tuple[float, ...], float | tuple[float, ...]]  # (latent_mean, latent_std)


def renormalise(x: torch.Tensor, old: Statistics, new: Statistics) -> torch.Tensor:
    """Latents (N, C, F, h, w) normalised with `old` (mean, std) re-expressed in `new`'s, in x's dtype."""
    raw = x.double() * _as_tensor(old[1]) + _as_tensor(old[0])
    return ((raw - _as_tensor(new[0])) / _as_tensor(new[1])).to(x.dtype)


def _as_tensor(value: float | tuple[float, ...]) -> torch.Tensor:
    """A scalar or per-channel statistic as a float64 tensor broadcasting against (N, C, F, h, w)."""
    return torch.tensor(value, dtype=torch.float64).reshape(1, -1, 1, 1, 1)


@torch.no_grad()
def encode_captions(encoder: TextEncoder, captions: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, masks = [], []
    for i in range(0, len(captions), batch):
        t, m = encoder.encode(captions[i : i + batch])
        tokens.append(t.half())
        masks.append(m)
    return torch.cat(tokens), torch.cat(masks)


@torch.no_grad()
def precompute(
    vae: CausalVAE,
    text_encoder: TextEncoder,
    count: int,
    seed: int = 0,
    frames: int = 49,
    height: int = 64,
    width: int = 64,
    batch: int = 16,
    progress: bool = True,
    compute_dtype: str = "float32",
) -> LatentSet:
    """Encode `count` training-split shapes clips (posterior means, normalised) and their captions. `compute_dtype`
    bfloat16 runs the encoder's convolutions in mixed precision (faster on a CPU with AMX); latents are stored
    in float16 either way."""
    vae.eval()
    data = iter(ShapesDataset(seed=seed, frames=frames, height=height, width=width))
    latents, caption_of = [], []
    for start in tqdm(range(0, count, batch), desc="encode latents", disable=not progress):
        videos, captions = zip(*(next(data) for _ in range(min(batch, count - start))))
        with autocast(compute_dtype):
            latents.append(vae.encode(torch.stack(videos)).half())
        caption_of += captions
    unique = ["", *sorted(set(caption_of))]
    index = {c: i for i, c in enumerate(unique)}
    tokens, mask = encode_captions(text_encoder, unique)
    ids = torch.tensor([index[c] for c in caption_of])
    log.info("encoded %d clips with %d distinct captions", count, len(unique) - 1)
    return LatentSet(torch.cat(latents), ids, unique, tokens, mask, vae.config.latent_mean, vae.config.latent_std)
