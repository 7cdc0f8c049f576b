"""A model = generator + VAE + text encoder + sampling defaults, as one dataclass; named presets in one dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from aptserve.engines.dit import DIT_PRESETS, DiTConfig
from aptserve.engines.prompts import CaptionGrammar
from aptserve.engines.text import TextEncoderConfig
from aptserve.engines.vae import VAE_PRESETS, VAEConfig

SIZE_MULTIPLE = 16  # VAE 8x spatial times patch 2


def parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """'WxH' (as the OpenAI API writes it) or (W, H) -> (W, H), checked against the model's size multiple."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must look like '1280x720' (width x height); got {size!r}")
        size = (int(parts[0]), int(parts[1]))
    width, height = size
    if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(f"width and height must be positive multiples of {SIZE_MULTIPLE}; got {width}x{height}")
    return width, height


@dataclass(frozen=True)
class ModelConfig:
    name: str
    dit: DiTConfig
    vae: VAEConfig
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    default_size: tuple[int, int] = (64, 64)  # (W, H)
    fps: int = 24
    default_steps: int = 1  # 1 or 2 for an APT generator; a teacher uses many with guidance
    guidance_scale: float = 1.0  # only used by many-step (teacher) sampling
    sample_shift: float = 1.0  # timestep shift of the many-step schedule
    two_step_t: float = 0.5  # where the zero-shot second step re-noises to
    # The caption grammar the model was trained on (engines.prompts.CaptionGrammar.to_dict()), if any: prompts it
    # covers are completed into that form before text encoding. None: prompts are encoded as written.
    prompt_grammar: dict[str, Any] | None = None
    # A distilled light decoder for this model's latents (a checkpoint folder holding a VAE, or the name of one in
    # the models directory), served with decoder="light". None: none shipped. Older config.json files lack the key.
    light_decoder: str | None = None

    def __post_init__(self) -> None:
        if self.dit.in_channels != self.vae.latent_channels:
            raise ValueError(
                f"generator in_channels {self.dit.in_channels} != VAE latent_channels {self.vae.latent_channels}"
            )
        if self.dit.text_dim != self.text.dim:
            raise ValueError(f"generator text_dim {self.dit.text_dim} != text encoder dim {self.text.dim}")
        parse_size(self.default_size)
        if self.prompt_grammar is not None:
            try:
                CaptionGrammar.from_dict(self.prompt_grammar)
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                raise ValueError(f"bad prompt_grammar: {exc!r}") from exc
        if self.light_decoder is not None and (not isinstance(self.light_decoder, str) or not self.light_decoder):
            raise ValueError(
                f"light_decoder must be a checkpoint folder or model name, or null; got {self.light_decoder!r}"
            )
        if self.fps < 1 or self.default_steps < 1 or self.sample_shift <= 0:
            raise ValueError(
                f"fps, default_steps and sample_shift must be positive; got {self.fps}, {self.default_steps}, {self.sample_shift}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict` (JSON lists become tuples); unknown or missing keys raise ValueError."""
        data = dict(data)
        for key, sub in (("dit", DiTConfig), ("vae", VAEConfig), ("text", TextEncoderConfig)):
            if key in data:
                data[key] = _build(sub, data[key], key)
        return _build(cls, data, "model")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {where!r} must be an object; got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown keys in config section {where!r}: {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"bad config section {where!r}: {exc}") from exc


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", dit=DIT_PRESETS["tiny"], vae=VAE_PRESETS["tiny"]),
    "apt-8b": ModelConfig(name="apt-8b", dit=DIT_PRESETS["apt-8b"], vae=VAE_PRESETS["wan"], default_size=(1280, 720)),
}


def frames_for_seconds(seconds: float, fps: int) -> int:
    """Frames of a clip of about `seconds`: 4 per latent frame plus the first one alone (2 s at 24 fps -> 49)."""
    if seconds <= 0 or fps < 1:
        raise ValueError(f"seconds and fps must be positive; got {seconds}, {fps}")
    latents = max(1, round(seconds * fps / 4)) + 1
    return 4 * latents - 3
