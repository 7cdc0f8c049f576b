"""A model = generator + VAE + text encoder + sampling defaults, as one dataclass; named presets in one dict.

The generator is one of two architectures, named by `arch`: our MMDiT ("mmdit", `DiTConfig`) or Wan2.1's
single-stream transformer ("wan2.1", `WanConfig`). Both take the same call, so everything past `build_generator`
(sampling, backends, serving, training) is shared."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from aptserve.engines.dit import DIT_PRESETS, DiTConfig, MMDiT
from aptserve.engines.prompts import CaptionGrammar
from aptserve.engines.text import TextEncoderConfig
from aptserve.engines.vae import VAE_PRESETS, VAEConfig
from aptserve.engines.wan import WAN_PRESETS, WanConfig, WanTransformer

GENERATORS: dict[str, tuple[type, type[nn.Module]]] = {
    "mmdit": (DiTConfig, MMDiT),
    "wan2.1": (WanConfig, WanTransformer),
}

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
    dit: DiTConfig | WanConfig  # the generator's shape: a DiTConfig for "mmdit", a WanConfig for "wan2.1"
    vae: VAEConfig
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    arch: str = "mmdit"
    default_size: tuple[int, int] = (64, 64)  # (W, H)
    # The sizes served, (W, H) each; empty: any multiple of 16 (within the server's pixel limit).
    sizes: tuple[tuple[int, int], ...] = ()
    fps: int = 24
    default_steps: int = 1  # 1 or 2 for an APT generator; a teacher uses many with guidance
    guidance_scale: float = 1.0  # only used by many-step (teacher) sampling
    negative_prompt: str = ""  # the unconditional prompt of guided sampling, when a request names none
    sample_shift: float = 1.0  # timestep shift of the many-step schedule
    two_step_t: float = 0.5  # where the zero-shot second step re-noises to
    # A few-step checkpoint's noise levels, 1.0 first and decreasing: a request for len(sample_sigmas) steps
    # predicts x0 at each level and re-noises it to the next (one step is (1.0,)). Empty: none.
    sample_sigmas: tuple[float, ...] = ()
    # The caption grammar the model was trained on (engines.prompts.CaptionGrammar.to_dict()), if any: prompts it
    # covers are completed into that form before text encoding. None: prompts are encoded as written.
    prompt_grammar: dict[str, Any] | None = None
    # A distilled light decoder for this model's latents (a checkpoint folder holding a VAE, or the name of one in
    # the models directory), served with decoder="light". None: none shipped. Older config.json files lack the key.
    light_decoder: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in GENERATORS:
            raise ValueError(f"unknown generator arch {self.arch!r}; choose one of {sorted(GENERATORS)}")
        if not isinstance(self.dit, GENERATORS[self.arch][0]):
            raise ValueError(f"arch {self.arch!r} needs a {GENERATORS[self.arch][0].__name__}; got {self.dit!r}")
        if self.dit.in_channels != self.vae.latent_channels:
            raise ValueError(
                f"generator in_channels {self.dit.in_channels} != VAE latent_channels {self.vae.latent_channels}"
            )
        if self.dit.text_dim != self.text.dim:
            raise ValueError(f"generator text_dim {self.dit.text_dim} != text encoder dim {self.text.dim}")
        if isinstance(self.dit, WanConfig) and self.text.max_length > self.dit.text_len:
            raise ValueError(
                f"text encoder max_length {self.text.max_length} exceeds the generator's text_len {self.dit.text_len}"
            )
        parse_size(self.default_size)
        for size in self.sizes:
            parse_size(tuple(size))
        if self.sizes and tuple(self.default_size) not in self.sizes:
            raise ValueError(f"default_size {self.default_size} is not one of sizes {self.sizes}")
        sigmas = self.sample_sigmas
        if sigmas and (sigmas[0] != 1.0 or sigmas[-1] <= 0 or any(a <= b for a, b in itertools.pairwise(sigmas))):
            raise ValueError(f"sample_sigmas must start at 1.0 and decrease, staying above 0; got {sigmas}")
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
        arch = data.get("arch", "mmdit")
        if arch not in GENERATORS:
            raise ValueError(f"unknown generator arch {arch!r}; choose one of {sorted(GENERATORS)}")
        for key, sub in (("dit", GENERATORS[arch][0]), ("vae", VAEConfig), ("text", TextEncoderConfig)):
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
    values = {k: tuples(v) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"bad config section {where!r}: {exc}") from exc


def tuples(value: Any) -> Any:
    """JSON lists, nested ones included, as the tuples the frozen configs hold."""
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value


def build_generator(config: ModelConfig) -> nn.Module:
    """The generator module `config.arch` names, with `config.dit`'s shape (built on the current default device)."""
    return GENERATORS[config.arch][1](config.dit)


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", dit=DIT_PRESETS["tiny"], vae=VAE_PRESETS["tiny"]),
    "apt-8b": ModelConfig(name="apt-8b", dit=DIT_PRESETS["apt-8b"], vae=VAE_PRESETS["wan"], default_size=(1280, 720)),
    # The Wan2.1 architecture at toy size on the default text encoder: the Wan code path with no download.
    "wan-tiny": ModelConfig(
        name="wan-tiny",
        arch="wan2.1",
        dit=dataclasses.replace(WAN_PRESETS["wan-tiny"], text_dim=384, text_len=32),
        vae=VAE_PRESETS["tiny"],
        fps=16,
    ),
}


def frames_for_seconds(seconds: float, fps: int) -> int:
    """Frames of a clip of about `seconds`: 4 per latent frame plus the first one alone (2 s at 24 fps -> 49)."""
    if seconds <= 0 or fps < 1:
        raise ValueError(f"seconds and fps must be positive; got {seconds}, {fps}")
    latents = max(1, round(seconds * fps / 4)) + 1
    return 4 * latents - 3
