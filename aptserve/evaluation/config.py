"""Evaluation settings: the systems compared (checkpoint, steps, guidance, prompt form, how the model runs), the pairs
compared with bootstrap intervals, and the run's sizes and paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aptserve.engines.backends.options import RunOptions
from aptserve.engines.config import parse_size
from aptserve.training.data import ShapeSpec, caption_of

FPS = 24  # the shapes dataset's frame rate
DEGRADE = {"blur": 1.0, "noise": 6.0, "soften": 2}  # the degradation the analyzer's robustness is reported on
PROMPT_FORMS = ("full", "short")
# "generate": the checkpoint generates every prompt; "vae": no generation, the checkpoint's VAE encodes and decodes
# the real clips of the other draw (the reference row's clips): the ceiling any generator in that latent space has.
KINDS = ("generate", "vae")
# What a claim checks on the interval of b / a ("ratio_*") or b - a ("difference_*") for a score: "below" holds when
# the whole interval is below the bound and fails when none of it is; "above" the other way round.
CLAIM_TESTS = ("ratio_below", "ratio_above", "difference_below", "difference_above")
CLAIM_SCORES = ("colour", "shape", "motion", "all", "purity", "frechet")
DTYPES = ("float32", "bfloat16")
# How a system's model runs, and the defaults every system had before these fields existed (the cache keys of
# systems left at the defaults do not name them).
RUN_DEFAULTS: dict[str, Any] = {"dtype": "float32", "attention": "auto", "fp8_linears": False, "bf16_blocks": ()}


@dataclass(frozen=True)
class SystemSpec:
    name: str
    model: str  # checkpoint folder or preset; a missing folder skips the system with a note
    steps: int = 1
    guidance: float | None = None  # CFG scale for many-step sampling; None = the checkpoint's own default
    # "full": each held-out spec's caption; "short": only its colour, shape and motion ("a red circle moving
    # left"), the form users type. Adherence reads the same three attributes either way.
    prompt: str = "full"
    # complete each prompt by the checkpoint's caption grammar, as serving does (engines.prompts); off by default,
    # so a system is measured on the prompts as written
    complete_prompts: bool = False
    # How the model runs, as the server runs it (engines.backends.options.RunOptions, applied after the pipeline is
    # built in `dtype`): the attention impl, FP8 linears (emulated where the device has no FP8 GEMM, so CPU runs
    # measure the same numerics) and the blocks kept out of FP8.
    dtype: str = "float32"
    attention: str = "auto"
    fp8_linears: bool = False
    bf16_blocks: tuple[int, ...] = ()
    kind: str = "generate"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bf16_blocks", tuple(self.bf16_blocks))  # a JSON list
        if self.kind not in KINDS:
            raise ValueError(f"system {self.name!r}: kind must be one of {KINDS}; got {self.kind!r}")
        if self.steps < 1:
            raise ValueError(f"system {self.name!r}: steps must be >= 1; got {self.steps}")
        if self.prompt not in PROMPT_FORMS:
            raise ValueError(f"system {self.name!r}: prompt must be one of {PROMPT_FORMS}; got {self.prompt!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"system {self.name!r}: dtype must be one of {DTYPES}; got {self.dtype!r}")
        try:
            self.run_options()
        except ValueError as exc:
            raise ValueError(f"system {self.name!r}: {exc}") from exc

    def run_options(self) -> RunOptions:
        return RunOptions(
            attention=self.attention, fp8_linears=self.fp8_linears, bf16_blocks=self.bf16_blocks, fp8_emulation=True
        )

    def run_changes(self) -> dict[str, Any]:
        """The run fields that differ from RUN_DEFAULTS, by name."""
        return {k: getattr(self, k) for k, default in RUN_DEFAULTS.items() if getattr(self, k) != default}

    def caption(self, spec: ShapeSpec) -> str:
        return spec.caption if self.prompt == "full" else caption_of(spec.colour, spec.shape, spec.motion)

    @property
    def cfg_label(self) -> str:
        """Guidance only applies to many-step sampling (1 and 2 steps run the generator as is)."""
        if self.steps <= 2 or self.kind == "vae":
            return "—"
        return "model default" if self.guidance is None else f"{self.guidance:g}"


DEFAULT_SYSTEMS = (
    SystemSpec("teacher 25 steps + CFG", "models/shapes-teacher-tiny", 25),  # the CFG scale distillation bakes in
    SystemSpec("teacher 1 step", "models/shapes-teacher-tiny", 1),
    SystemSpec("consistency 1 step", "models/shapes-cd-tiny", 1),
    SystemSpec("APT 1 step", "models/shapes-apt-tiny", 1),
    SystemSpec("APT 2 steps", "models/shapes-apt-tiny", 2),
    SystemSpec("APT without aR1, 1 step", "models/shapes-apt-nor1-tiny", 1),
)


@dataclass(frozen=True)
class ClaimSpec:
    """A claim about two systems of the config, decided by the interval of b / a or b - a for one score."""

    claim: str
    a: str
    b: str
    score: str
    test: str
    bound: float

    def __post_init__(self) -> None:
        if self.score not in CLAIM_SCORES or self.test not in CLAIM_TESTS:
            raise ValueError(
                f"claim {self.claim!r}: score must be one of {CLAIM_SCORES} and test one of {CLAIM_TESTS}; "
                f"got {self.score!r}, {self.test!r}"
            )


@dataclass(frozen=True)
class EvalConfig:
    systems: tuple[SystemSpec, ...] = DEFAULT_SYSTEMS  # JSON: a list of {name, model, steps, guidance}
    prompts: int = 256  # held-out prompts (287 held-out combinations; more prompts reuse them at new positions)
    # Noise draws per prompt: every system generates each prompt this many times (new noise each), and the real
    # sets hold as many clips of each prompt (new start positions), so a table rests on prompts x draws clips.
    draws: int = 1
    # The real clips draw the attributes a short prompt leaves open (size, speed, background) anew for every clip,
    # so they sample what a short prompt allows; for tables of short prompts. Off: each prompt's real clips are
    # its held-out spec's, at new start positions.
    real_open: bool = False
    seed: int = 0  # picks the prompts, their positions and the generation seeds
    size: str = "64x64"
    seconds: float = 2.0
    batch_size: int = 8
    classifier: str = "runs/eval-classifier.pt"  # cached; retrained when the fields below change
    real_clips: int = 2048  # rendered training-split clips the classifier learns from
    classifier_epochs: int = 8
    classifier_batch: int = 64
    out: str = "runs/eval/table.md"  # markdown fragment for docs/QUALITY.md; results JSON beside it
    sheets: str = "docs/quality"  # contact-sheet PNGs, one per system plus real.png
    sheet_prompts: int = 4
    links_relative_to: str = "docs"  # image links in the markdown are relative to where it will be merged
    device: str = "cpu"
    cache: str = "runs/eval/systems"  # per-system results, keyed by everything they depend on; "" disables
    # Bootstrap over prompts: resamples (0: no intervals), their seed, and the central interval's coverage.
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    # Pairs of system names (reference, candidate) compared on the same prompts and seeds: intervals of the
    # candidate's difference from the reference and whether it stays within the reference's interval.
    comparisons: tuple[tuple[str, str], ...] = ()
    # Claims decided by their intervals (ClaimSpec; JSON: a list of {claim, a, b, score, test, bound}).
    claims: tuple[ClaimSpec, ...] = ()

    def __post_init__(self) -> None:
        systems = tuple(s if isinstance(s, SystemSpec) else _system_from_dict(s) for s in self.systems)
        object.__setattr__(self, "systems", systems)
        claims = tuple(c if isinstance(c, ClaimSpec) else _claim_from_dict(c) for c in self.claims)
        object.__setattr__(self, "claims", claims)
        object.__setattr__(self, "comparisons", tuple(tuple(pair) for pair in self.comparisons))
        parse_size(self.size)
        numbers = {
            "prompts": self.prompts,
            "batch_size": self.batch_size,
            "real_clips": self.real_clips,
            "classifier_epochs": self.classifier_epochs,
            "classifier_batch": self.classifier_batch,
            "draws": self.draws,
        }
        bad = {k: v for k, v in numbers.items() if v < (2 if k == "prompts" else 1)}  # a covariance needs 2
        if bad or self.sheet_prompts < 0 or self.seconds <= 0:
            raise ValueError(f"eval config: need positive counts (prompts >= 2) and seconds; got {bad}, {self.seconds}")
        if len({s.name for s in systems}) != len(systems):
            raise ValueError(f"eval config: system names must be unique; got {[s.name for s in systems]}")
        if self.bootstrap < 0 or not 0 < self.confidence < 1:
            raise ValueError(
                f"eval config: need bootstrap >= 0 and 0 < confidence < 1; got {self.bootstrap}, {self.confidence}"
            )
        for system in systems:  # options the device cannot run fail here, not after the systems before them ran
            try:
                system.run_options().check(self.device)
            except ValueError as exc:
                raise ValueError(f"eval config: system {system.name!r}: {exc}") from exc
        names = {s.name for s in systems}
        bad_pairs = [p for p in self.comparisons if len(p) != 2 or not set(p) <= names or p[0] == p[1]]
        if bad_pairs:
            raise ValueError(f"eval config: comparisons are pairs of two system names of this config; got {bad_pairs}")
        bad_claims = [c.claim for c in claims if not {c.a, c.b} <= names or c.a == c.b]
        if bad_claims:
            raise ValueError(f"eval config: claims must name two systems of this config; got {bad_claims}")

    @property
    def clips(self) -> int:
        """Clips per system: every prompt, every draw."""
        return self.prompts * self.draws


def _claim_from_dict(data: dict) -> ClaimSpec:
    try:
        return ClaimSpec(**data)
    except TypeError as exc:
        raise ValueError(f"eval config: bad claim {data}: {exc}; keys are claim, a, b, score, test, bound") from exc


def _system_from_dict(data: dict) -> SystemSpec:
    try:
        return SystemSpec(**data)
    except TypeError as exc:
        raise ValueError(
            f"eval config: bad system {data}: {exc}; keys are name, model, steps, guidance, prompt, "
            "complete_prompts, dtype, attention, fp8_linears, bf16_blocks, kind"
        ) from exc
