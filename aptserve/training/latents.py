"""Precomputed training data for the diffusion stages: VAE latents of shapes clips plus text embeddings of their
captions, encoded once so every later step costs only the transformer."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aptserve.engines.config import ModelConfig
from aptserve.engines.loading import load_text_encoder
from aptserve.engines.text import TextEncoder, TextEncoderConfig
from aptserve.engines.vae import CausalVAE, LatentNormalisation, VAEConfig, normalisation_tensors
from aptserve.training.common import autocast
from aptserve.training.data import (
    COLOURS,
    MOTIONS,
    SHAPES,
    ShapesDataset,
    caption_of,
    named_attributes,
    shorter_captions,
)

ATTRIBUTES = ("colour", "shape", "motion")  # what a clip can contradict in a caption, in caption_slots order
VALUES = {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "motion": tuple(MOTIONS)}  # each attribute's values
log = logging.getLogger("aptserve.training.latents")


def attribute_mask(differ: tuple[str, ...]) -> torch.Tensor:
    """(3,) bool: which of ATTRIBUTES a negative's caption may contradict; `differ` must name some of them."""
    if not differ or not set(differ) <= set(ATTRIBUTES):
        raise ValueError(f"differ must name some of {ATTRIBUTES}; got {differ}")
    return torch.tensor([a in differ for a in ATTRIBUTES])


def swap_partners(pairs: tuple[tuple[str, str], ...]) -> torch.Tensor:
    """(3, W) long: for each attribute's value index the value index it swaps to alone, -1 where it is in no pair.
    Each pair names two values of one attribute ("circle", "square"); a value may be in one pair only."""
    width = max(len(v) for v in VALUES.values())
    partner = torch.full((len(ATTRIBUTES), width), -1, dtype=torch.long)
    for pair in pairs:
        where = [a for a in ATTRIBUTES if len(pair) == 2 and set(pair) <= set(VALUES[a])]
        if not where or pair[0] == pair[1]:
            raise ValueError(f"a swap pair must name two values of one of {ATTRIBUTES}; got {pair}")
        a = ATTRIBUTES.index(where[0])
        v, w = (VALUES[where[0]].index(x) for x in pair)
        if partner[a, v] >= 0 or partner[a, w] >= 0:
            raise ValueError(f"a value may be in one swap pair only; {pair} repeats one")
        partner[a, v], partner[a, w] = w, v
    return partner


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, F, h, w) normalised VAE latents, float16 on disk
    caption_ids: torch.Tensor  # (N,) index into captions
    captions: list[str]
    text_tokens: torch.Tensor  # (U, L, D) one row per unique caption; row 0 is the empty prompt
    text_mask: torch.Tensor  # (U, L) bool
    # the normalisation `latents` are in: latents = (mu - latent_mean) / latent_std, per channel or scalar, with
    # the first latent frames' own per-channel statistics where first_frames_std has rows (VAEConfig's fields)
    latent_mean: float | tuple[float, ...]
    latent_std: float | tuple[float, ...]
    first_frames_mean: tuple[tuple[float, ...], ...] = ()
    first_frames_std: tuple[tuple[float, ...], ...] = ()
    # (U, 7): for each caption row, the rows of its shorter captions (optional attributes left out); rows without
    # shorter captions (the empty prompt, the shorter captions themselves) list their own row. None until
    # `with_shorter_captions` adds them.
    shorter_ids: torch.Tensor | None = None
    # (U, 3, 6): for each caption row, attribute (ATTRIBUTES order) and value index, the row of the same caption with
    # that attribute alone changed to that value; -1 for its own value, for an attribute it does not name and for the
    # swapped captions themselves. None until `with_swapped_captions` adds them.
    swapped_ids: torch.Tensor | None = None

    @property
    def normalisation(self) -> LatentNormalisation:
        return (self.latent_mean, self.latent_std, self.first_frames_mean, self.first_frames_std)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def caption_rows(self, indices: torch.Tensor, shorter: float = 0.0) -> torch.Tensor:
        """The caption row of each of these samples; a fraction `shorter` of them gets one of its shorter captions,
        drawn uniformly."""
        ids = self.caption_ids[indices]
        if shorter > 0:
            if self.shorter_ids is None:
                raise ValueError("this latent set has no shorter captions; add them with with_shorter_captions")
            pick = torch.rand(len(ids)) < shorter
            ids = torch.where(pick, self.shorter_ids[ids, torch.randint(self.shorter_ids.shape[1], (len(ids),))], ids)
        return ids

    def batch(
        self, indices: torch.Tensor, shorter: float = 0.0, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, text, mask) for these sample indices, in float32, captioned by `rows` (by `caption_rows` when
        None)."""
        ids = self.caption_rows(indices, shorter) if rows is None else rows
        return self.latents[indices].float(), self.text_tokens[ids].float(), self.text_mask[ids]

    def swapped(
        self, rows: torch.Tensor, differ: tuple[str, ...] = ATTRIBUTES, pairs: tuple[tuple[str, str], ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, mask) of each caption row with one attribute of `differ`, and nothing else, changed to another
        value (attribute and value drawn uniformly among those the row names): the hardest negatives of a
        matching-aware discriminator, which can reject "a red square moving left" for a red circle moving left only
        by reading the shape. A value in one of `pairs` swaps to its partner only (("circle", "square"): the two
        shapes D confuses face each other every time). Needs `with_swapped_captions`."""
        if self.swapped_ids is None:
            raise ValueError("this latent set has no swapped captions; add them with with_swapped_captions")
        vary = attribute_mask(differ)
        choices = self.swapped_ids[rows] * vary[None, :, None]  # (B, 3, 6), rows of attributes not in differ -> 0
        allowed = (choices > 0).float()  # row 0 is the empty prompt, never a swap
        if pairs:
            own = self.caption_slots(rows)  # (B, 3)
            partner = swap_partners(pairs).gather(1, own.clamp(min=0).T).T.masked_fill(own < 0, -1)
            paired = partner >= 0
            only = torch.nn.functional.one_hot(partner.clamp(min=0), allowed.shape[-1]).float()
            allowed = torch.where(paired[..., None], allowed * only, allowed)
        allowed = allowed.flatten(1)
        missing = allowed.sum(dim=1) == 0
        if missing.any():
            row = int(rows[missing.nonzero()[0, 0]])
            raise ValueError(f"caption {self.captions[row]!r} has no swap in {', '.join(differ)}")
        other = choices.flatten(1).gather(1, torch.multinomial(allowed, 1)).squeeze(1)
        return self.text_tokens[other].float(), self.text_mask[other]

    def mismatched(
        self,
        indices: torch.Tensor,
        slots: torch.Tensor,
        shorter: float = 0.0,
        differ: tuple[str, ...] = ATTRIBUTES,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, mask) of a caption that contradicts each of these samples: another sample's caption (shortened as
        `batch` shortens) naming a different value of at least one attribute in `differ` (of "colour", "shape",
        "motion") and the clip's own value of every other one, the negatives of a matching-aware discriminator
        (GAN-CLS). `differ=("shape",)` gives hard negatives: the same colour and motion with another shape, which D
        can only reject by reading the shape. The attributes come from the captions' words, so a shorter caption
        contradicts a clip exactly when its full caption does. `slots` is `caption_slots()`, computed once by the
        caller."""
        vary = attribute_mask(differ)
        every = slots[self.caption_ids]  # (N, 3)
        own = every[indices]  # (B, 3)
        same = every.unsqueeze(0) == own.unsqueeze(1)  # (B, N, 3)
        allowed = (same[..., ~vary].all(dim=-1) & ~same[..., vary].all(dim=-1)).float()
        missing = allowed.sum(dim=1) == 0
        if missing.any():
            clip = int(indices[missing.nonzero()[0, 0]])
            raise ValueError(
                f"no caption contradicts clip {clip} ({self.captions[int(self.caption_ids[clip])]!r}) "
                f"in {', '.join(differ)} alone: the set names too few values"
            )
        other = torch.multinomial(allowed, 1).squeeze(1)
        _, text, mask = self.batch(other, shorter)
        return text, mask

    def caption_slots(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(U, 3) per caption row (of `rows`, or every row): the index of the colour, shape and motion it names (-1
        where none)."""
        captions = self.captions if rows is None else [self.captions[r] for r in rows.tolist()]
        named = [named_attributes(c) for c in captions]
        rows = [[VALUES[k].index(n[k]) if k in n else -1 for k in ATTRIBUTES] for n in named]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)

    def with_shorter_captions(self, encoder: TextEncoder) -> LatentSet:
        """The same set with every caption's shorter captions (`training.data.shorter_captions`) encoded and indexed
        in `shorter_ids`; a set that has them already is returned as is."""
        if self.shorter_ids is not None:
            return self
        if self.swapped_ids is not None:
            raise ValueError("add shorter captions before swapped ones, so that the shorter ones are swapped too")
        captions = list(self.captions)
        row = {c: i for i, c in enumerate(captions)}
        shorter = {c: shorter_captions(c) for c in self.captions if c}
        new = sorted({s for variants in shorter.values() for s in variants} - set(row))
        for caption in new:
            row[caption] = len(captions)
            captions.append(caption)
        width = max((len(v) for v in shorter.values()), default=1)
        ids = torch.arange(len(captions)).unsqueeze(1).repeat(1, width)
        for caption, variants in shorter.items():
            if variants:  # a caption already missing attributes has fewer: they repeat to fill the row
                ids[row[caption]] = torch.tensor([row[v] for v in itertools.islice(itertools.cycle(variants), width)])
        tokens, mask = encode_captions(encoder, new) if new else (self.text_tokens[:0], self.text_mask[:0])
        log.info("encoded %d shorter captions of %d captions", len(new), len(shorter))
        fields = {**self.__dict__, "captions": captions, "shorter_ids": ids}
        fields |= {"text_tokens": torch.cat([self.text_tokens, tokens]), "text_mask": torch.cat([self.text_mask, mask])}
        return LatentSet(**fields)

    def with_swapped_captions(self, encoder: TextEncoder) -> LatentSet:
        """The same set with `swapped_ids`: every caption row's one-attribute swaps (colour, shape or motion changed,
        the rest of the caption as written), the ones not in the set already encoded and appended. Add shorter
        captions first, so that theirs are swapped too; a set that has swaps already is returned as is."""
        if self.swapped_ids is not None:
            return self
        width = max(len(v) for v in VALUES.values())
        captions = list(self.captions)
        row = {c: i for i, c in enumerate(captions)}
        wanted: dict[tuple[int, int, int], str] = {}
        for i, caption in enumerate(self.captions):
            named = named_attributes(caption)
            if not caption or not set(ATTRIBUTES) <= named.keys() or caption_of(**named) != caption:
                continue  # the empty prompt, or a caption outside the grammar: no swaps
            for a, name in enumerate(ATTRIBUTES):
                for v, value in enumerate(VALUES[name]):
                    if value != named[name]:
                        wanted[i, a, v] = caption_of(**{**named, name: value})
        new = sorted(set(wanted.values()) - set(row))
        for caption in new:
            row[caption] = len(captions)
            captions.append(caption)
        ids = torch.full((len(captions), len(ATTRIBUTES), width), -1, dtype=torch.long)
        for (i, a, v), caption in wanted.items():
            ids[i, a, v] = row[caption]
        tokens, mask = encode_captions(encoder, new) if new else (self.text_tokens[:0], self.text_mask[:0])
        log.info("encoded %d swapped captions of %d captions", len(new), len(self.captions))
        fields = {**self.__dict__, "captions": captions, "swapped_ids": ids}
        fields |= {"text_tokens": torch.cat([self.text_tokens, tokens]), "text_mask": torch.cat([self.text_mask, mask])}
        if self.shorter_ids is not None:  # the new rows have no shorter captions: they list their own row
            own = torch.arange(len(self.captions), len(captions)).unsqueeze(1).expand(-1, self.shorter_ids.shape[1])
            fields["shorter_ids"] = torch.cat([self.shorter_ids, own])
        return LatentSet(**fields)

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

    def raw_statistics(self, first_frames: int = 0) -> LatentNormalisation:
        """Per-channel mean and std of the unnormalised latents over clips and positions: for each of the first
        `first_frames` latent frames apart, and over the remaining frames (all of them when `first_frames` is 0)."""
        frames = self.latents.shape[2]
        if not 0 <= first_frames < frames:
            raise ValueError(f"first_frames must be in [0, {frames}) for {frames}-frame latents; got {first_frames}")
        channels = self.latents.shape[1]
        sums = torch.zeros(channels, first_frames + 1, dtype=torch.float64)  # column k < first_frames: frame k
        squares = torch.zeros_like(sums)
        for chunk in self.latents.split(512):
            raw = renormalise(chunk.double(), self.normalisation, (0.0, 1.0, (), ()))
            for k in range(first_frames + 1):
                part = raw[:, :, k] if k < first_frames else raw[:, :, first_frames:]
                sums[:, k] += part.transpose(0, 1).reshape(channels, -1).sum(1)
                squares[:, k] += part.square().transpose(0, 1).reshape(channels, -1).sum(1)
        per_frame = self.latents[:, 0, 0].numel()
        counts = torch.tensor([per_frame] * first_frames + [per_frame * (frames - first_frames)], dtype=torch.float64)
        means = sums / counts
        stds = (squares / counts - means.square()).clamp_min(0).sqrt()

        def rounded(column: torch.Tensor) -> tuple[float, ...]:
            return tuple(round(v, 6) for v in column.tolist())

        head = range(first_frames)
        return (
            rounded(means[:, -1]),
            rounded(stds[:, -1]),
            tuple(rounded(means[:, k]) for k in head),
            tuple(rounded(stds[:, k]) for k in head),
        )

    def normalised_as(self, vae: VAEConfig) -> LatentSet:
        """The same set in `vae`'s latent normalisation (a generator trained on it sees what its VAE encodes)."""
        if vae.normalisation == self.normalisation:
            return self
        latents = torch.cat(
            [renormalise(chunk, self.normalisation, vae.normalisation) for chunk in self.latents.split(512)]
        )
        fields = {**self.__dict__, "latents": latents}
        fields |= dict(zip(("latent_mean", "latent_std", "first_frames_mean", "first_frames_std"), vae.normalisation))
        return LatentSet(**fields)


def check_text_fits(latents: LatentSet, config: ModelConfig, where: str) -> None:
    """Refuse a latent set whose text tokens the generator `config` describes cannot read: another width, or (Wan,
    which zero-pads prompts to a fixed length) more tokens than that length. `where` names the checkpoint."""
    _, length, dim = latents.text_tokens.shape
    limit = getattr(config.dit, "text_len", None)
    if dim != config.dit.text_dim or (limit is not None and length > limit):
        raise ValueError(
            f"the latent set's text tokens ({length} x {dim}) do not fit {where}'s generator (text_dim "
            f"{config.dit.text_dim}, at most {limit or 'any'} tokens): encode the latents with its text encoder"
        )


def ensure_shorter_captions(latents: LatentSet, path: str | Path, text: TextEncoderConfig) -> LatentSet:
    """`latents` (as loaded from `path`) with its shorter captions, encoded with `text` once and saved back."""
    return _added_once(latents, path, text, latents.shorter_ids, LatentSet.with_shorter_captions)


def ensure_swapped_captions(latents: LatentSet, path: str | Path, text: TextEncoderConfig) -> LatentSet:
    """`latents` (as loaded from `path`) with its swapped captions, encoded with `text` once and saved back."""
    return _added_once(latents, path, text, latents.swapped_ids, LatentSet.with_swapped_captions)


def _added_once(
    latents: LatentSet,
    path: str | Path,
    text: TextEncoderConfig,
    present: torch.Tensor | None,
    add: Callable[[LatentSet, TextEncoder], LatentSet],
) -> LatentSet:
    if present is not None:
        return latents
    latents = add(latents, load_text_encoder(text))
    latents.save(path)
    return latents


def renormalise(x: torch.Tensor, old: LatentNormalisation, new: LatentNormalisation) -> torch.Tensor:
    """Latents (N, C, F, h, w) normalised with `old` re-expressed in `new`'s, in x's dtype (computed in float64)."""
    like = x.double()
    old_mean, old_std = normalisation_tensors(old, like)
    new_mean, new_std = normalisation_tensors(new, like)
    return ((like * old_std + old_mean - new_mean) / new_std).to(x.dtype)


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
    return LatentSet(torch.cat(latents), ids, unique, tokens, mask, *vae.config.normalisation)
