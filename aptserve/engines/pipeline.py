"""Prompt(s) -> streamed uint8 frame chunks: text encode, one generator step, then a latent-frame-by-frame VAE decode.

`Pipeline.generate` is an iterator of `FrameChunk`s; each carries the cumulative per-stage timings so far, so the
caller can record them (the pipeline itself never touches metrics). Closing the iterator stops the work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from aptserve.engines import sampling
from aptserve.engines.config import ModelConfig, frames_for_seconds, parse_size
from aptserve.engines.loading import LoadedModel, cast_model, load_light_decoder, load_model, load_text_encoder
from aptserve.engines.prompts import CaptionGrammar
from aptserve.engines.text import CachedTextEncoder, TextEncoder

if TYPE_CHECKING:
    from aptserve.engines.group import ParallelGroup

STAGES = ("text_encode", "dit", "vae_decode")
DECODERS = ("full", "light")  # the VAE's own decoder, or the model's distilled light one (ModelConfig.light_decoder)
# Sequence length at which a generator pass spends about as much on attention as on its linears (apt-8b at 720p x 49
# frames: 0.98 vs 0.77 PFLOP, DESIGN.md 3): past it a token costs more, since attention grows with the square.
ATTENTION_TOKENS = 46_800


class Cancelled(Exception):
    """Raised inside `generate` when its `cancelled` callback says so: between stages, chunks and generator blocks."""


@dataclass(frozen=True)
class GenerationRequest:
    prompts: Sequence[str]
    seeds: Sequence[int]
    width: int
    height: int
    frames: int
    steps: int = 1
    guidance_scale: float | None = None  # many-step (teacher) sampling only; None = the model's default
    negative_prompt: str | None = None  # guided sampling only; None = the model's default
    complete_prompts: bool = True  # complete short prompts by the model's caption grammar, where it has one

    def __post_init__(self) -> None:
        if not self.prompts or len(self.prompts) != len(self.seeds):
            raise ValueError(f"need one seed per prompt; got {len(self.prompts)} prompts and {len(self.seeds)} seeds")
        parse_size((self.width, self.height))
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames must be 4*k + 1 (1, 5, ..., 49, ...); got {self.frames}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")


@dataclass
class FrameChunk:
    frames: np.ndarray  # (B, F, H, W, 3) uint8
    index: int  # chunk number; chunk 0 holds 1 frame, each later chunk 4
    start_frame: int
    num_chunks: int
    timings: dict[str, float] = field(default_factory=dict)  # cumulative seconds per stage, so far

    @property
    def is_last(self) -> bool:
        return self.index == self.num_chunks - 1


def resolve_device(device: str | None = None, dtype: str | None = None) -> tuple[str, torch.dtype]:
    """The one place a device and dtype are chosen: CUDA in bf16 when available, else the CPU in fp32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")
    return device, getattr(torch, dtype)


def sigma_list(config: ModelConfig, steps: int) -> tuple[float, ...]:
    """The sigma list a `steps`-step request re-noises along, or () when it integrates the flow instead."""
    if config.sample_sigmas and steps == len(config.sample_sigmas):
        return config.sample_sigmas
    return {1: (1.0,), 2: (1.0, config.two_step_t)}.get(steps, ())


def generator_passes(config: ModelConfig, steps: int) -> int:
    """Generator forward passes per sample at the model's guidance: one per step, two per step when guided."""
    return steps if sigma_list(config, steps) or config.guidance_scale == 1.0 else 2 * steps


def request_cost(config: ModelConfig, width: int, height: int, frames: int, steps: int) -> int:
    """Estimated work of one sample, in token-passes: one video token through one generator pass at short sequence
    length. Each pass costs tokens x (1 + tokens / ATTENTION_TOKENS); the decoder adds one token-pass per token's
    worth of decoded pixels (4 frames x 16 x 16 for a 4x8x8 VAE and 1x2x2 patches)."""
    vae, (pf, ph, pw) = config.vae, config.dit.patch_size
    cell = vae.spatial_factor
    tokens = vae.latents_for_frames(frames) // pf * (height // (cell * ph)) * (width // (cell * pw))
    per_pass = tokens + tokens * tokens // ATTENTION_TOKENS
    pixels_per_token = vae.temporal_factor * pf * cell * ph * cell * pw
    return generator_passes(config, steps) * per_pass + frames * width * height // pixels_per_token


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()


def load_generation_model(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, decoder: str = "full"
) -> LoadedModel:
    """The generator and the VAE a pipeline runs (`Pipeline.from_name`, less the text encoder): `decoder` "light"
    swaps in the model's distilled light decoder."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
    model = load_model(spec, device, dtype)
    if decoder == "light":
        folder = model.source if Path(model.source).is_dir() else None
        model = dataclasses.replace(model, vae=load_light_decoder(model.config, folder, device, dtype))
    return model


class Pipeline:
    def __init__(
        self,
        model: LoadedModel,
        text_encoder: TextEncoder,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.config: ModelConfig = model.config
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.dit = cast_model(model.dit.to(self.device), dtype).eval()
        self.vae = cast_model(model.vae.to(self.device), dtype).eval()
        grammar = self.config.prompt_grammar
        self.grammar = CaptionGrammar.from_dict(grammar) if grammar is not None else None
        self.group: ParallelGroup | None = None  # set by ParallelGroup.attach: dit and vae then run on its ranks

    @classmethod
    def from_name(
        cls,
        spec: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 1024,
        decoder: str = "full",
    ) -> Pipeline:
        """A checkpoint folder, a folder under models/, or a preset (random weights), with its text encoder.
        `decoder` "light" decodes with the model's distilled light decoder instead of its VAE's own."""
        model = load_generation_model(spec, device, dtype, decoder)
        text_encoder = CachedTextEncoder(load_text_encoder(model.config.text, device), cache_size)
        return cls(model, text_encoder, device, dtype)

    def request(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int] = 0,
        size: str | tuple[int, int] | None = None,
        seconds: float = 2.0,
        steps: int | None = None,
        **kwargs,
    ) -> GenerationRequest:
        """Build a request in user units: 'WxH', seconds; one seed or one per prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        width, height = parse_size(size or self.config.default_size)
        frames = frames_for_seconds(seconds, self.config.fps)
        steps = steps or self.config.default_steps
        return GenerationRequest(prompts, seeds, width, height, frames, steps, **kwargs)

    def generate(
        self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False
    ) -> Iterator[FrameChunk]:
        """Run one request; yields chunks as the VAE decodes them. `cancelled` is polled between stages, between
        decode chunks and after every generator block (on CUDA: as the block is launched)."""
        timings = dict.fromkeys(STAGES, 0.0)
        with torch.inference_mode():
            with _timed(timings, "text_encode", self.device):
                text, mask = self.encode_text(self.complete_prompts(request).prompts)
            _check(cancelled)
            with _timed(timings, "dit", self.device), _checked_between_blocks(self.dit, cancelled):
                latent = self.denoise(request, text, mask)
            _check(cancelled)
            num_chunks = latent.shape[2]
            cache, start = self.vae.init_decode_cache(), 0
            for index in range(num_chunks):
                with _timed(timings, "vae_decode", self.device):
                    video, cache = self.vae.decode_chunk(latent[:, :, index : index + 1], cache)
                    frames = to_uint8(video)
                yield FrameChunk(frames, index, start, num_chunks, dict(timings))
                start += frames.shape[1]
                if index < num_chunks - 1:
                    _check(cancelled)

    def generate_video(self, request: GenerationRequest) -> tuple[np.ndarray, dict[str, float]]:
        """The whole clip at once: (B, F, H, W, 3) uint8 and the final stage timings."""
        chunks = list(self.generate(request))
        return np.concatenate([c.frames for c in chunks], axis=1), chunks[-1].timings

    def complete_prompts(self, request: GenerationRequest) -> GenerationRequest:
        """The request as the text encoder will read it: each prompt completed by the model's caption grammar with
        its seed (aptserve.engines.prompts), marked done; unchanged when the model has no grammar or it opts out."""
        if self.grammar is None or not request.complete_prompts:
            return request
        prompts = [self.grammar.complete(p, s) for p, s in zip(request.prompts, request.seeds)]
        return dataclasses.replace(request, prompts=prompts, complete_prompts=False)

    def num_chunks(self, request: GenerationRequest) -> int:
        """How many chunks `generate` yields: one per latent frame (1 frame, then 4 each)."""
        return self.latent_shape(request)[1]

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text, mask = self.text_encoder.encode(prompts)
        return text.to(self.device, self.dtype), mask.to(self.device)  # (B, L, Dt), (B, L)

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        vae = self.config.vae
        return (vae.latent_channels, vae.latents_for_frames(request.frames), request.height // 8, request.width // 8)

    def denoise(self, request: GenerationRequest, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Noise -> clean latent. A step count the model has a sigma list for (its `sample_sigmas`; one step is
        (1.0,), two steps the zero-shot (1.0, two_step_t)) predicts and re-noises along it; any other count runs
        Euler on the shifted schedule, with classifier-free guidance where the model or request asks for it."""
        shape = self.latent_shape(request)
        z = sampling.get_noise(request.seeds, shape, self.device).to(self.dtype)  # (B, C, F, H, W)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.dit(x, t.to(self.dtype), text, mask)

        if sigmas := sigma_list(self.config, request.steps):
            eps = [  # fresh noise per re-noising, seeded from the request so a sample repeats exactly
                sampling.get_noise([s + 1_000_003 * k for s in request.seeds], shape, self.device).to(self.dtype)
                for k in range(1, len(sigmas))
            ]
            return sampling.renoise(velocity, z, sigmas, eps)
        scale = self.config.guidance_scale if request.guidance_scale is None else request.guidance_scale
        if scale != 1.0:
            negative = self.config.negative_prompt if request.negative_prompt is None else request.negative_prompt
            neg_text, neg_mask = self.encode_text([negative] * len(request.prompts))

            def uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.dit(x, t.to(self.dtype), neg_text, neg_mask)

            velocity = sampling.guided(velocity, uncond, scale)
        return sampling.euler(velocity, z, request.steps, self.config.sample_shift)


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled("generation cancelled")


@contextmanager
def _checked_between_blocks(dit: torch.nn.Module, cancelled: Callable[[], bool]):
    """Poll `cancelled` after every generator block while open, through the generator's `between_blocks` hook."""
    dit.between_blocks = lambda: _check(cancelled)
    try:
        yield
    finally:
        dit.between_blocks = None


@contextmanager
def _timed(timings: dict[str, float], stage: str, device: torch.device):
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[stage] += time.perf_counter() - start
