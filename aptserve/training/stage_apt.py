"""Stage 3: adversarial post-training. The consistency-distilled student becomes a one-step generator
G(z, c) = z - v(z, c, t=1), trained against a discriminator initialised from the diffusion teacher, with
approximated R1, 1:1 alternating D and G steps, and an EMA of G that is exported as the inference model."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aptserve.engines.config import ModelConfig, build_generator
from aptserve.engines.dit import MMDiT
from aptserve.engines.loading import load_components, save_checkpoint, storage_dtype
from aptserve.engines.sampling import one_step
from aptserve.engines.vae import CausalVAE
from aptserve.engines.wan import WanTransformer
from aptserve.training.common import EMA, RunDir, Trainer, seed_everything
from aptserve.training.discriminator import (
    TRAIN_ATTENTION,
    Discriminator,
    approx_r1,
    check_loss,
    d_adversarial_loss,
    g_adversarial_loss,
    perturbation_std,
    sample_d_timesteps,
)
from aptserve.training.latents import (
    ATTRIBUTES,
    LatentSet,
    attribute_mask,
    check_text_fits,
    ensure_shorter_captions,
    ensure_swapped_captions,
    swap_partners,
)

log = logging.getLogger("aptserve.training.apt")
OPTIMIZERS = ("adam", "rmsprop")
LR_SCHEDULES = ("constant", "linear")
MISMATCH_CAPTIONS = ("borrowed", "swapped")


@dataclass(frozen=True)
class APTStageConfig:
    out: str = "runs/apt"
    export: str = "models/shapes-apt-tiny"
    teacher: str = "models/shapes-teacher-tiny"  # diffusion checkpoint: D starts from it, its VAE is exported
    generator: str = "models/shapes-cd-tiny"  # consistency-distilled checkpoint: G starts from it
    latents: str = "runs/latents-tiny.pt"
    steps: int = 1000  # each step is one D update then one G update
    batch_size: int = 16  # per micro-batch; each update averages `accumulate` of them
    accumulate: int = 1  # micro-batches per D and per G update: an effective batch of batch_size * accumulate
    lr_g: float = 3e-6  # the paper's video value; small models want more (config files override)
    lr_d: float = 3e-6
    lr_schedule: str = "constant"  # "linear": both lrs fall linearly from their value at step 0 to 0 after the last
    optimizer: str = "adam"  # "adam": Adam(betas=(0, alpha)), bias-corrected; "rmsprop": RMSprop(alpha)
    rmsprop_alpha: float = 0.9
    ema_decay: float = 0.995
    ema_warmup: bool = False  # min(decay, (1 + n) / (10 + n)): for runs much shorter than 1 / (1 - decay)
    loss: str = "nonsaturating"  # or "relativistic" (APT2/SeedVR2), which adds approximated R2 on fakes
    use_r1: bool = True  # the ablation switch: without it D wins and G collapses
    r1_lambda: float = 100.0  # also the R2 weight with the relativistic loss (APT2 used 1000)
    r1_sigma: float = 0.1  # 0.1 for video, 0.01 for images
    sigma_is_variance: bool = False  # the paper says "variance"; False reads sigma as a standard deviation
    d_shift: float = 12.0  # D's timestep ensemble shift(U(0, 1), s): 12 for video, 1 for images
    # Matching-aware D (GAN-CLS): real clips under a caption that contradicts them are negatives too, weighted by
    # this against the fakes' term; 0 leaves them out. Without them D may judge realism alone, and G's caption
    # adherence gets no signal from D at all.
    mismatch_weight: float = 0.0
    # The attributes a negative's caption contradicts (at least one of them; it agrees on the others): all three, or
    # ("shape",) for hard negatives that D can reject only by reading the shape.
    mismatch_differ: tuple[str, ...] = ATTRIBUTES
    # Where a negative's caption comes from. "borrowed": another clip's caption that contradicts this clip in
    # mismatch_differ; it also names that clip's own size, speed and background, which D can reject it by alone.
    # "swapped": this clip's own caption with one attribute of mismatch_differ changed and nothing else.
    mismatch_captions: str = "borrowed"
    # With "swapped": pairs of values that swap only to each other, e.g. [["circle", "square"]], so that the values D
    # confuses are each other's negative every time (the others still swap to any other value).
    mismatch_pairs: tuple[tuple[str, str], ...] = ()
    # A projection term at the latent's own resolution added to D's logit (discriminator.MatchingBranch), trained
    # with its own optimizer at lr_branch (lr_d when None). A run whose state predates it resumes with a fresh one.
    matching_branch: bool = False
    lr_branch: float | None = None
    # Updates of a fresh branch alone before the adversarial steps, as a matching classifier on real clips: each clip
    # under its own caption a positive, under its swapped caption a negative (needs swapped negatives). The branch is
    # tiny and reads clean latents, so this costs seconds; without it the branch learns shape only as fast as D's
    # mismatch term teaches it, while G already trains against it.
    branch_warmup: int = 0
    shorter_captions: float = 0.0  # fraction of samples with a shorter caption of their clip (G and D alike)
    export_dtype: str = "float16"  # storage precision of the exported checkpoint (half the size of float32)
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    device: str = "cpu"

    @property
    def branch_lr(self) -> float:
        """The matching branch's learning rate: lr_branch, or lr_d when that is None."""
        return self.lr_d if self.lr_branch is None else self.lr_branch

    @property
    def negatives(self) -> str | None:
        """Which mismatched-caption negatives D sees: "borrowed", "swapped", or None without them."""
        return self.mismatch_captions if self.mismatch_weight > 0 else None

    def __post_init__(self) -> None:
        check_loss(self.loss)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "accumulate": self.accumulate}
        positive |= {"lr_g": self.lr_g, "lr_d": self.lr_d}
        positive |= {"r1_sigma": self.r1_sigma, "d_shift": self.d_shift}
        positive |= {"checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
        if self.lr_branch is not None:
            positive["lr_branch"] = self.lr_branch
        bad = {k: v for k, v in positive.items() if not v > 0}
        if self.branch_warmup < 0:
            bad["branch_warmup"] = self.branch_warmup
        if bad:
            raise ValueError(f"APTStageConfig values must be positive; got {bad}")
        if self.mismatch_captions not in MISMATCH_CAPTIONS:
            raise ValueError(f"unknown mismatch_captions {self.mismatch_captions!r}; choose one of {MISMATCH_CAPTIONS}")
        try:
            attribute_mask(self.mismatch_differ)
        except ValueError as exc:
            raise ValueError(f"mismatch_differ: {exc}") from None
        object.__setattr__(self, "mismatch_pairs", tuple(tuple(p) for p in self.mismatch_pairs))  # JSON gives lists
        if self.mismatch_pairs and self.mismatch_captions != "swapped":
            raise ValueError('mismatch_pairs needs mismatch_captions "swapped"')
        try:
            swap_partners(self.mismatch_pairs)
        except ValueError as exc:
            raise ValueError(f"mismatch_pairs: {exc}") from None
        if self.branch_warmup and not (self.matching_branch and self.negatives == "swapped"):
            raise ValueError("branch_warmup needs matching_branch and swapped negatives (mismatch_weight > 0)")
        if not 0.0 <= self.rmsprop_alpha < 1.0 or self.r1_lambda < 0 or self.mismatch_weight < 0:
            raise ValueError(
                "need 0 <= rmsprop_alpha < 1, r1_lambda >= 0 and mismatch_weight >= 0; "
                f"got {self.rmsprop_alpha}, {self.r1_lambda}, {self.mismatch_weight}"
            )


def make_optimizer(params: Iterable[nn.Parameter], lr: float, cfg: APTStageConfig) -> torch.optim.Optimizer:
    """RMSProp with alpha 0.9 as the paper states it, i.e. Adam with beta1 = 0; no weight decay, no clipping."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=cfg.rmsprop_alpha, eps=1e-8, weight_decay=0.0)
    return torch.optim.Adam(params, lr=lr, betas=(0.0, cfg.rmsprop_alpha), eps=1e-8, weight_decay=0.0)


def lr_factor(step: int, cfg: APTStageConfig) -> float:
    """The multiplier of both learning rates at 0-based `step`; a function of the step alone, so a resumed run
    continues the schedule without scheduler state."""
    return 1.0 - step / cfg.steps if cfg.lr_schedule == "linear" else 1.0


def set_learning_rates(parts: APTParts, step: int, cfg: APTStageConfig) -> None:
    factor = lr_factor(step, cfg)
    rates = [(parts.opt_g, cfg.lr_g), (parts.opt_d, cfg.lr_d)]
    if parts.opt_branch is not None:
        rates.append((parts.opt_branch, cfg.branch_lr))
    for opt, lr in rates:
        for group in opt.param_groups:
            group["lr"] = lr * factor


@dataclass
class APTParts:
    """Everything a step updates, and everything a resumed run needs back."""

    generator: MMDiT | WanTransformer
    disc: Discriminator
    ema: EMA
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer  # D without its matching branch
    opt_branch: torch.optim.Optimizer | None = None  # the matching branch's, when D has one

    @property
    def fresh_branch(self) -> bool:
        """D has a matching branch that has never been updated (in this run or the state it resumed)."""
        return self.opt_branch is not None and not self.opt_branch.state

    @property
    def d_optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.opt_d,) if self.opt_branch is None else (self.opt_d, self.opt_branch)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "generator": self.generator.state_dict(),
            "disc": self.disc.state_dict(),
            "ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }
        if self.opt_branch is not None:
            state["opt_branch"] = self.opt_branch.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        branch_missing = self.disc.branch is not None and "opt_branch" not in state
        missing, unexpected = self.disc.load_state_dict(state["disc"], strict=not branch_missing)
        if unexpected or any(not name.startswith("branch.") for name in missing):
            raise RuntimeError(f"discriminator state does not match: missing {missing}, unexpected {unexpected}")
        if branch_missing:
            log.info("the run's state has no matching branch: D resumes with a fresh one")
        self.ema.load_state_dict(state["ema"])
        device = next(self.generator.parameters()).device  # the run file is loaded onto the CPU
        self.ema.shadow = {name: value.to(device) for name, value in self.ema.shadow.items()}
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.opt_branch is not None and not branch_missing:
            self.opt_branch.load_state_dict(state["opt_branch"])


def make_parts(teacher: MMDiT | WanTransformer, generator: MMDiT | WanTransformer, cfg: APTStageConfig) -> APTParts:
    """D from a copy of the teacher (the teacher itself is left untouched), G from the student, both trainable."""
    disc = Discriminator(teacher, matching_branch=cfg.matching_branch).to(cfg.device).train()
    generator = generator.to(cfg.device).train().requires_grad_(True)
    generator.attention_impl = TRAIN_ATTENTION
    opt_g = make_optimizer(generator.parameters(), cfg.lr_g, cfg)
    opt_d = make_optimizer(disc.main_parameters(), cfg.lr_d, cfg)
    opt_branch = None
    if disc.branch is not None:
        opt_branch = make_optimizer(disc.branch.parameters(), cfg.branch_lr, cfg)
    return APTParts(generator, disc, EMA(generator, cfg.ema_decay, cfg.ema_warmup), opt_g, opt_d, opt_branch)


def generate(
    generator: MMDiT | WanTransformer, z: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """G(z, c) = z - v(z, c, t=1): always the final timestep; CFG is already baked in by distillation."""
    return one_step(lambda x, t: generator(x, t, text, mask), z)


def sample_batch(
    data: LatentSet, cfg: APTStageConfig, indices: torch.Tensor | None = None, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if indices is None:
        indices = torch.randint(len(data), (cfg.batch_size,))
    x, text, mask = data.batch(indices, cfg.shorter_captions, rows)
    return x.to(cfg.device), text.to(cfg.device), mask.to(cfg.device)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter gradients for `module` (gradients still flow through it to its inputs)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def d_losses(
    disc: Discriminator,
    real: torch.Tensor,  # (B, C, F, h, w)
    fake: torch.Tensor,  # (B, C, F, h, w), detached
    text: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,  # (B,) shared by a real sample, its fake and their perturbations
    eps_real: torch.Tensor,
    eps_fake: torch.Tensor | None,
    cfg: APTStageConfig,
    wrong: tuple[torch.Tensor, torch.Tensor] | None = None,  # (text, mask) contradicting `real`, when mismatch_weight
) -> dict[str, torch.Tensor]:
    """D's loss terms; the perturbed copies for approximated R1 (and R2) and the real clips under contradicting
    captions ride in the same forward pass."""
    std = perturbation_std(cfg.r1_sigma, cfg.sigma_is_variance)
    with_r2 = cfg.use_r1 and cfg.loss == "relativistic"
    inputs = [real, fake]
    if cfg.use_r1:
        inputs.append(real + std * eps_real)
    if with_r2:
        inputs.append(fake + std * eps_fake)
    texts, masks = [text] * len(inputs), [mask] * len(inputs)
    if wrong is not None:
        inputs.append(real)
        texts.append(wrong[0])
        masks.append(wrong[1])
    n = len(inputs)
    logits = disc(torch.cat(inputs), t.repeat(n), torch.cat(texts), torch.cat(masks)).chunk(n)  # n x (B,)
    adversarial = d_adversarial_loss(logits[0], logits[1], cfg.loss)
    r1 = approx_r1(logits[0], logits[2], cfg.r1_lambda) if cfg.use_r1 else torch.zeros((), device=real.device)
    losses = {"d_loss": adversarial, "r1": r1, "d_real": logits[0].mean(), "d_fake": logits[1].mean()}
    if with_r2:
        losses["r2"] = approx_r1(logits[1], logits[3], cfg.r1_lambda)
    losses["total"] = adversarial + r1 + losses.get("r2", 0.0)
    if wrong is not None:  # a real clip under a wrong caption is rated as a fake is: softplus(D(x, c'))
        losses["d_mismatch"] = logits[-1].mean()
        losses["mismatch"] = F.softplus(logits[-1]).mean()
        losses["total"] = losses["total"] + cfg.mismatch_weight * losses["mismatch"]
    return losses


def accumulated(micro_step: Callable[[], dict[str, torch.Tensor]], n: int) -> dict[str, float]:
    """Run `n` micro-batches, backpropagating each one's "total" / n (so the summed gradient is that of their mean,
    i.e. of one batch n times larger), and return every logged value averaged over them."""
    sums: dict[str, float] = {}
    for _ in range(n):
        losses = micro_step()
        (losses.pop("total") / n).backward()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item() / n
    return sums


def warm_up_branch(parts: APTParts, data: LatentSet, cfg: APTStageConfig) -> dict[str, float]:
    """`cfg.branch_warmup` updates of D's matching branch alone (see APTStageConfig.branch_warmup), at lr_branch and
    a batch of batch_size * accumulate clips; returns the mean loss and the share of clips whose own caption the
    branch rated above the swapped one, over the last 50 updates."""
    branch = parts.disc.branch
    if branch is None:
        raise ValueError("D has no matching branch to warm up")
    n = cfg.batch_size * cfg.accumulate
    last: list[tuple[float, float]] = []
    for _ in range(cfg.branch_warmup):
        indices = torch.randint(len(data), (n,))
        rows = data.caption_rows(indices, cfg.shorter_captions)
        x, text, mask = sample_batch(data, cfg, indices, rows)
        wrong_text, wrong_mask = data.swapped(rows, cfg.mismatch_differ, cfg.mismatch_pairs)
        features = branch.features(x)
        own = branch.score(features, text, mask)
        wrong = branch.score(features, wrong_text.to(cfg.device), wrong_mask.to(cfg.device))
        loss = d_adversarial_loss(own, wrong, "nonsaturating")  # the own caption a real, the swapped one a fake
        parts.opt_branch.zero_grad(set_to_none=True)
        loss.backward()
        parts.opt_branch.step()
        last = [*last[-49:], (loss.item(), (own > wrong).float().mean().item())]
    return {"loss": sum(v[0] for v in last) / len(last), "right": sum(v[1] for v in last) / len(last)}


def d_micro_step(
    parts: APTParts, data: LatentSet, cfg: APTStageConfig, slots: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    indices = torch.randint(len(data), (cfg.batch_size,))
    rows = data.caption_rows(indices, cfg.shorter_captions)
    real, text, mask = sample_batch(data, cfg, indices, rows)
    with torch.no_grad():
        fake = generate(parts.generator, torch.randn_like(real), text, mask)
    t = sample_d_timesteps(cfg.batch_size, cfg.d_shift, device=cfg.device)
    eps_fake = torch.randn_like(fake) if cfg.loss == "relativistic" else None
    wrong = None
    if cfg.negatives == "swapped":
        wrong_text, wrong_mask = data.swapped(rows, cfg.mismatch_differ, cfg.mismatch_pairs)
        wrong = wrong_text.to(cfg.device), wrong_mask.to(cfg.device)
    elif cfg.negatives == "borrowed":
        wrong_text, wrong_mask = data.mismatched(
            indices, data.caption_slots() if slots is None else slots, cfg.shorter_captions, cfg.mismatch_differ
        )
        wrong = wrong_text.to(cfg.device), wrong_mask.to(cfg.device)
    return d_losses(parts.disc, real, fake, text, mask, t, torch.randn_like(real), eps_fake, cfg, wrong)


def d_step(
    parts: APTParts, data: LatentSet, cfg: APTStageConfig, slots: torch.Tensor | None = None
) -> dict[str, float]:
    for opt in parts.d_optimizers:
        opt.zero_grad(set_to_none=True)
    logged = accumulated(lambda: d_micro_step(parts, data, cfg, slots), cfg.accumulate)
    for opt in parts.d_optimizers:
        opt.step()
    return logged


def g_micro_step(parts: APTParts, data: LatentSet, cfg: APTStageConfig) -> dict[str, torch.Tensor]:
    real, text, mask = sample_batch(data, cfg)
    t = sample_d_timesteps(cfg.batch_size, cfg.d_shift, device=cfg.device)
    fake = generate(parts.generator, torch.randn_like(real), text, mask)
    d_fake = parts.disc(fake, t, text, mask)
    with torch.no_grad():
        d_real = parts.disc(real, t, text, mask) if cfg.loss == "relativistic" else None
    loss = g_adversarial_loss(d_fake, d_real, cfg.loss)
    return {"total": loss, "g_loss": loss.detach()}


def g_step(parts: APTParts, data: LatentSet, cfg: APTStageConfig) -> dict[str, float]:
    parts.opt_g.zero_grad(set_to_none=True)
    with frozen(parts.disc):
        logged = accumulated(lambda: g_micro_step(parts, data, cfg), cfg.accumulate)
    parts.opt_g.step()
    parts.ema.update(parts.generator)
    return logged


def build(cfg: APTStageConfig) -> tuple[APTParts, LatentSet, ModelConfig, CausalVAE]:
    """Load teacher, student and latents; the returned config is what the exported one-step model carries."""
    teacher_config, teacher = load_components(cfg.teacher, ("dit", "vae"))
    student_config, student = load_components(cfg.generator, ("dit",))
    if teacher_config.arch != student_config.arch:
        raise ValueError(
            f"{cfg.generator} is a {student_config.arch} generator but {cfg.teacher} a {teacher_config.arch} teacher: "
            "the discriminator is the teacher, the generator must be distilled from it"
        )
    normalisations = {c.vae.normalisation for c in (teacher_config, student_config)}
    if len(normalisations) > 1:
        raise ValueError(
            f"{cfg.generator} and {cfg.teacher} use different latent normalisations; "
            "the generator must be distilled from this teacher"
        )
    data = LatentSet.load(cfg.latents)
    if cfg.shorter_captions > 0:
        data = ensure_shorter_captions(data, cfg.latents, teacher_config.text)
    if cfg.negatives == "swapped":
        data = ensure_swapped_captions(data, cfg.latents, teacher_config.text)
    for where, model_config in ((cfg.teacher, teacher_config), (cfg.generator, student_config)):
        check_text_fits(data, model_config, where)
    data = data.normalised_as(teacher_config.vae)
    parts = make_parts(teacher["dit"], student["dit"], cfg)
    config = dataclasses.replace(
        teacher_config,
        name=Path(cfg.export).name,
        arch=student_config.arch,
        dit=student_config.dit,
        default_steps=1,
        guidance_scale=1.0,
        sample_sigmas=(),  # a one-step generator: a teacher's few-step sigma list does not apply
    )
    return parts, data, config, teacher["vae"]


def export(parts: APTParts, config: ModelConfig, vae: CausalVAE, cfg: APTStageConfig) -> Path:
    """The EMA generator with the teacher's VAE, as a full inference checkpoint."""
    g_ema = build_generator(config)
    parts.ema.copy_to(g_ema)
    return save_checkpoint(cfg.export, config, {"dit": g_ema, "vae": vae}, storage_dtype(cfg.export_dtype))


def train_apt(cfg: APTStageConfig, progress: bool = True) -> Path:
    storage_dtype(cfg.export_dtype)  # a bad name fails now, not at export
    seed_everything(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    parts, data, config, vae = build(cfg)
    run = RunDir(cfg.out)

    def get_state() -> dict[str, Any]:
        return {**parts.state_dict(), "config": dataclasses.asdict(cfg)}

    trainer = Trainer(
        run, cfg.steps, get_state, parts.load_state_dict, cfg.checkpoint_every, cfg.log_every, progress, "train apt"
    )
    trainer.resume()
    if cfg.branch_warmup and parts.fresh_branch:
        set_learning_rates(parts, trainer.step, cfg)
        warm = warm_up_branch(parts, data, cfg)
        log.info(
            "matching branch: %d updates alone; last 50: loss %.3f, own caption above the swapped one for %.1f%%",
            cfg.branch_warmup,
            warm["loss"],
            100 * warm["right"],
        )
    slots = data.caption_slots() if cfg.negatives == "borrowed" else None

    def step(i: int) -> dict[str, float]:
        set_learning_rates(parts, i, cfg)
        return {**d_step(parts, data, cfg, slots), **g_step(parts, data, cfg)}  # 1:1 alternation, D first

    if trainer.fit(step) < cfg.steps:
        log.info("stopped at step %d; run the same command again to resume", trainer.step)
        return run.path
    return export(parts, config, vae, cfg)
