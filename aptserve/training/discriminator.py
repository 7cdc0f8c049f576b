"""The APT discriminator and its losses: a fully trainable copy of the diffusion teacher (MMDiT or Wan2.1) whose
video tokens at depths 16/26/36 of 36 are read by cross-attention heads, concatenated, normalised and projected to
one logit."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from aptserve import kernels
from aptserve.engines.dit import Mlp, MMDiT
from aptserve.engines.sampling import shift
from aptserve.engines.wan import WanTransformer

HEAD_FRACTIONS = (16 / 36, 26 / 36, 36 / 36)  # the paper's blocks 16, 26, 36 of 36
LOSSES = ("nonsaturating", "relativistic")
# Training needs autograd; the Triton kernels that "auto" may pick on CUDA are forward-only.
TRAIN_ATTENTION = "sdpa"


def head_blocks(depth: int, fractions: tuple[float, ...] = HEAD_FRACTIONS) -> tuple[int, ...]:
    """0-based indices of the blocks whose outputs the heads read: block round(depth * f), counted from 1."""
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"head fractions must lie in (0, 1]; got {fractions}")
    blocks = tuple(math.floor(depth * f + 0.5) - 1 for f in fractions)  # half-up, not banker's, rounding
    if min(blocks) < 0 or len(set(blocks)) != len(blocks) or list(blocks) != sorted(blocks):
        raise ValueError(f"depth {depth} is too small for distinct head blocks at fractions {fractions}: {blocks}")
    return blocks


class CrossAttentionHead(nn.Module):
    """A transformer block without self-attention: one learnable token cross-attends to every video token of a
    layer (pre-norm keys/values), then an MLP; the token is the block's output."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head width {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(0.02 * torch.randn(1, dim))
        self.kv_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # No key bias: it would shift every score of the single query equally, which softmax ignores.
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape  # (B, N, D)
        heads = (self.num_heads, d // self.num_heads)
        q = self.query.view(1, 1, *heads).transpose(1, 2).expand(b, -1, -1, -1)  # (B, H, 1, Dh)
        kv = self.kv_norm(tokens)
        k = self.k(kv).unflatten(-1, heads).transpose(1, 2)  # (B, H, N, Dh)
        v = self.v(kv).unflatten(-1, heads).transpose(1, 2)
        attended = kernels.attention(q, k, v, impl=TRAIN_ATTENTION).flatten(1)  # (B, D)
        token = self.query + self.out(attended)  # (B, D)
        return token + self.mlp(self.mlp_norm(token))


class _NoOutput(nn.Module):
    """Stands in for the backbone's output layer, which D never reads: no parameters, zeros of the right width."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.width)


def drop_output_layer(backbone: MMDiT | WanTransformer) -> None:
    """Replace the velocity output layer, which D never reads, by parameter-free zeros of the same widths: its
    weights would get no gradient. The backbone's forward runs unchanged up to the output."""
    config = backbone.config
    if isinstance(backbone, MMDiT):
        backbone.final_mod = _NoOutput(2 * config.hidden_size)
        backbone.final_proj = _NoOutput(config.patch_dim)
    elif isinstance(backbone, WanTransformer):
        backbone.final_proj = _NoOutput(backbone.final_proj.out_features)
        del backbone.final_table  # a parameter; zeros as a buffer keep forward's arithmetic valid
        backbone.register_buffer("final_table", torch.zeros(1, 2, config.hidden_size), persistent=False)
    else:
        raise ValueError(f"no discriminator for a {type(backbone).__name__} teacher; expected MMDiT or WanTransformer")


def mlp_width(backbone: MMDiT | WanTransformer) -> int:
    """The hidden width of the backbone's block MLPs, which the heads' MLPs copy."""
    config = backbone.config
    return config.ffn_dim if isinstance(backbone, WanTransformer) else int(config.hidden_size * config.mlp_ratio)


class MatchingBranch(nn.Module):
    """A projection-discriminator term read at the latent's own resolution: two 3x3 convolutions over each latent
    frame, max-pooled over positions and frames, dotted with a linear projection of the caption's mean token.

    The backbone's tokens each cover a patch of latent pixels, and on the tiny model a copy of the teacher did not
    learn to tell a circle from a square by the caption, trained for that alone; a small convolutional net on the
    same clean latents tells them apart in a few hundred updates (docs/QUALITY_LOG.md). The caption projection starts
    at zero, so adding the branch to a trained D leaves its logits unchanged at the first step."""

    def __init__(self, channels: int, text_dim: int, width: int = 128):
        super().__init__()
        self.width = width
        self.convs = nn.Sequential(  # per frame: 2D convolutions over (B * F) frames are the fast ones on CPU
            nn.Conv2d(channels, width // 2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 3, padding=1),
            nn.GELU(),
        )
        self.text = nn.Linear(text_dim, width)
        nn.init.zeros_(self.text.weight)
        nn.init.zeros_(self.text.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) clean latents -> (B, width), max-pooled over frames and positions."""
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)
        return self.convs(frames).amax(dim=(2, 3)).view(b, f, -1).amax(dim=1)

    def score(self, features: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The branch's logit for `features(x)` under a caption: one clip's features can be scored under several."""
        weights = text_mask.unsqueeze(-1).to(text.dtype)  # (B, L, 1)
        caption = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, text_dim)
        return (features * self.text(caption)).sum(dim=-1) / math.sqrt(self.width)  # (B,)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x), text, text_mask)


class Discriminator(nn.Module):
    """D(x, t, c) -> one logit per sample, for a clean latent x conditioned on t and the prompt; with
    `matching_branch`, the MatchingBranch's term is added to the heads' logit."""

    def __init__(
        self,
        teacher: MMDiT | WanTransformer,
        fractions: tuple[float, ...] = HEAD_FRACTIONS,
        matching_branch: bool = False,
    ):
        super().__init__()
        config = teacher.config
        self.blocks_read = head_blocks(config.depth, fractions)
        backbone = copy.deepcopy(teacher)  # APT: the original diffusion weights, every one trained
        backbone.requires_grad_(True)
        backbone.blocks = backbone.blocks[: self.blocks_read[-1] + 1]  # later blocks would feed no head
        drop_output_layer(backbone)
        backbone.attention_impl = TRAIN_ATTENTION
        self.backbone = backbone
        d = config.hidden_size
        heads = (CrossAttentionHead(d, config.num_heads, mlp_width(teacher)) for _ in fractions)
        self.heads = nn.ModuleList(heads)
        self.norm = nn.LayerNorm(len(fractions) * d, elementwise_affine=False, eps=1e-6)
        self.proj = nn.Linear(len(fractions) * d, 1)
        # Registered last, so the parameters before it keep the order of a D without it (and its optimizer state).
        self.branch = MatchingBranch(config.in_channels, config.text_dim) if matching_branch else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        _, features = self.backbone(x, t, text, text_mask, return_features=self.blocks_read)  # [(B, N, D)] * 3
        tokens = torch.cat([head(f) for head, f in zip(self.heads, features)], dim=-1)  # (B, 3D)
        logit = self.proj(self.norm(tokens)).squeeze(-1)  # (B,)
        if self.branch is not None:
            logit = logit + self.branch(x, text, text_mask)
        return logit

    def main_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the matching branch's, which has an optimizer (and learning rate) of its own."""
        return [p for name, p in self.named_parameters() if not name.startswith("branch.")]


def sample_d_timesteps(
    n: int, shift_s: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """D's timestep ensemble t = shift(U(0, 1), s): s = 1 for images, 12 for video (t near 0 collapses)."""
    return shift(torch.rand(n, generator=generator).to(device), shift_s)


def perturbation_std(sigma: float, sigma_is_variance: bool) -> float:
    """The paper calls sigma a variance; by default we read it as a standard deviation."""
    return math.sqrt(sigma) if sigma_is_variance else sigma


def approx_r1(d_real: torch.Tensor, d_perturbed: torch.Tensor, lam: float) -> torch.Tensor:
    """Approximated R1 (or R2 on fake data): lam * (D(x) - D(x + sigma * eps))^2, averaged over the batch."""
    return lam * (d_real - d_perturbed).pow(2).mean()


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown adversarial loss {loss!r}; choose one of {LOSSES}")


def d_adversarial_loss(d_real: torch.Tensor, d_fake: torch.Tensor, loss: str) -> torch.Tensor:
    """Non-saturating softplus(-D(x)) + softplus(D(G(z))), or relativistic pairing softplus(-(D(x) - D(G(z))))."""
    check_loss(loss)
    if loss == "relativistic":
        return F.softplus(d_fake - d_real).mean()
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def g_adversarial_loss(d_fake: torch.Tensor, d_real: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Non-saturating softplus(-D(G(z))), or relativistic softplus(-(D(G(z)) - D(x)))."""
    check_loss(loss)
    if loss == "relativistic":
        return F.softplus(d_real - d_fake).mean()
    return F.softplus(-d_fake).mean()
