"""Precomputed training data for the diffusion stages: VAE latents of shapes clips plus text embeddings of their
captions, encoded once so every later step costs only the transformer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engines.text import TextEncoder
from engines.vae import CausalVAE
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
        return cls(**torch.load(path, map_location="cpu", weights_only=False))


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
    return LatentSet(torch.cat(latents), ids, unique, tokens, mask)
