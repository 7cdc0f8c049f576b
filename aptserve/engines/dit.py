"""MMDiT generator (SD3-style dual stream) for latent video, in reading order: layers, block, config, model.

Video latents (B, C, F, H, W) are patchified (1, 2, 2) into tokens; text tokens come from the text encoder. Each
block keeps separate weights for the two streams and runs one joint attention over [text; video] with QK RMSNorm
and 3D RoPE on the video tokens. Timestep modulation is computed once from the conditioning vector and shared by
every block, which adds its own learned table (PixArt-alpha's adaLN-single, applied to both streams).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aptserve import kernels

# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


# An attention impl name (kernels.ATTENTION_IMPLS), or a callable (q, k, v, key_padding_mask) -> out standing in
# for kernels.attention: the sequence-parallel attention of engines.parallel.
Attention = str | Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, impl: Attention
) -> torch.Tensor:
    """kernels.attention by impl name, or the callable given in its place."""
    if callable(impl):
        return impl(q, k, v, key_padding_mask)
    return kernels.attention(q, k, v, key_padding_mask, impl=impl)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 so the frequencies see DDPM-like integers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split a head dim into (frame, height, width) rotary parts, each even; height and width get equal shares."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def token_grid(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (F, H, W) token grid a latent of this shape patchifies to."""
    f, h, w = latent_shape[-3:]
    pf, ph, pw = patch_size
    if f % pf or h % ph or w % pw:
        raise ValueError(f"latent (F, H, W) = {(f, h, w)} is not divisible by patch size {patch_size}")
    return f // pf, h // ph, w // pw


def check_inputs(x: torch.Tensor, text: torch.Tensor, config) -> tuple[int, int, int]:
    """A generator's inputs against its config (in_channels, text_dim, patch_size); returns the token grid."""
    if x.shape[1] != config.in_channels or text.shape[-1] != config.text_dim:
        raise ValueError(
            f"expected {config.in_channels} latent channels and text dim {config.text_dim}; "
            f"got {x.shape[1]} and {text.shape[-1]}"
        )
    return token_grid(x.shape, config.patch_size)


def rope_3d(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rotation angles for every video token of an (F, H, W) grid, flattened f-major: (N, head_dim // 2)."""
    axes = []
    for size, dim in zip(grid, rope_axis_dims(head_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)
        axes.append(torch.arange(size, dtype=dtype, device=device)[:, None] * freqs[None])  # (size, dim/2)
    f, h, w = grid
    angles = torch.cat(
        [
            axes[0][:, None, None].expand(f, h, w, -1),
            axes[1][None, :, None].expand(f, h, w, -1),
            axes[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return angles.reshape(f * h * w, head_dim // 2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, H, N, D) by angles (N, D/2), in fp32."""
    x2 = x.float().unflatten(-1, (-1, 2))  # (B, H, N, D/2, 2)
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class StreamAttentionIn(nn.Module):
    """One stream's half of joint attention: pre-norm, modulation, projection to (q,) k, v and QK RMSNorm."""

    def __init__(self, dim: int, num_heads: int, with_query: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.with_query = with_query
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, (3 if with_query else 2) * dim)
        self.q_norm = RMSNorm(dim // num_heads) if with_query else None
        self.k_norm = RMSNorm(dim // num_heads)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qkv = self.qkv(modulate(self.norm(x), shift, scale))  # (B, N, 3D) or (B, N, 2D)
        parts = qkv.unflatten(-1, (-1, self.num_heads, x.shape[-1] // self.num_heads)).permute(2, 0, 3, 1, 4)
        if not self.with_query:
            return None, self.k_norm(parts[0]), parts[1]  # (B, H, N, Dh)
        return self.q_norm(parts[0]), self.k_norm(parts[1]), parts[2]


# ---------------------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------------------

# Modulation rows per stream: shift/scale/gate for attention, then for the MLP.
MOD_ROWS = 6


class MMDiTBlock(nn.Module):
    """Dual-stream block. The last block is `context_pre_only`: its text stream only feeds keys and values, since
    nothing reads the text tokens after it (so it has no text queries, output projection or MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        text_rows = 2 if context_pre_only else MOD_ROWS
        # Per-block modulation table added to the shared projection (adaLN-single).
        self.mod_table = nn.Parameter(torch.zeros(MOD_ROWS + text_rows, dim))
        self.video_in = StreamAttentionIn(dim, num_heads)
        self.text_in = StreamAttentionIn(dim, num_heads, with_query=not context_pre_only)
        self.video_out = nn.Linear(dim, dim)
        self.video_mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.video_mlp = Mlp(dim, int(dim * mlp_ratio))
        if not context_pre_only:
            self.text_out = nn.Linear(dim, dim)
            self.text_mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.text_mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        video: torch.Tensor,  # (B, Nv, D)
        text: torch.Tensor,  # (B, Nt, D)
        mod: torch.Tensor,  # (B, 2 * MOD_ROWS, D) shared modulation
        rope: torch.Tensor,  # (Nv, Dh / 2)
        key_padding_mask: torch.Tensor,  # (B, Nt + Nv) bool
        attention_impl: Attention,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.mod_table.shape[0]
        mod = mod[:, :rows] + self.mod_table  # (B, rows, D)
        v_shift1, v_scale1, v_gate1, v_shift2, v_scale2, v_gate2 = mod[:, :MOD_ROWS].unbind(1)
        t_mod = mod[:, MOD_ROWS:].unbind(1)

        vq, vk, vv = self.video_in(video, v_shift1, v_scale1)  # (B, H, Nv, Dh)
        tq, tk, tv = self.text_in(text, t_mod[0], t_mod[1])  # (B, H, Nt, Dh)
        vq, vk = apply_rope(vq, rope), apply_rope(vk, rope)
        q = vq if self.context_pre_only else torch.cat([tq, vq], 2)  # (B, H, Nq, Dh)
        k, v = torch.cat([tk, vk], 2), torch.cat([tv, vv], 2)  # (B, H, Nt + Nv, Dh)
        out = attend(q, k, v, key_padding_mask, attention_impl).transpose(1, 2).flatten(2)
        num_text_queries = q.shape[2] - video.shape[1]
        text_attn, video_attn = out[:, :num_text_queries], out[:, num_text_queries:]  # (B, N, D)

        video = video + v_gate1[:, None] * self.video_out(video_attn)
        video = video + v_gate2[:, None] * self.video_mlp(modulate(self.video_mlp_norm(video), v_shift2, v_scale2))
        if self.context_pre_only:
            return video, None
        _, _, t_gate1, t_shift2, t_scale2, t_gate2 = t_mod
        text = text + t_gate1[:, None] * self.text_out(text_attn)
        text = text + t_gate2[:, None] * self.text_mlp(modulate(self.text_mlp_norm(text), t_shift2, t_scale2))
        return video, text


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Generator shape. `apt-8b` follows the paper's 36 blocks and ~8B parameters; the paper does not state width,
    heads or MLP ratio, so 3072 / 24 x 128 / 4x is our reconstruction."""

    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 384
    rope_theta: float = 10000.0
    freq_dim: int = 256

    def __post_init__(self) -> None:
        if self.depth < 1 or self.hidden_size < 1 or self.num_heads < 1:
            raise ValueError(
                f"depth, hidden_size, num_heads must be >= 1; got {self.depth}, {self.hidden_size}, {self.num_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2 or head_dim < 12:
            raise ValueError(f"head dim {head_dim} is too small or odd for 3D RoPE (needs an even value >= 12)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints; got {self.patch_size}")
        if self.mlp_ratio <= 0 or self.text_dim < 1 or self.in_channels < 1:
            raise ValueError(
                f"mlp_ratio, text_dim, in_channels must be positive; got {self.mlp_ratio}, {self.text_dim}, {self.in_channels}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * math.prod(self.patch_size)


DIT_PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(depth=6, hidden_size=256, num_heads=4),
    "small": DiTConfig(depth=12, hidden_size=512, num_heads=8),
    "apt-8b": DiTConfig(depth=36, hidden_size=3072, num_heads=24),
}


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """Predicts the flow-matching velocity v = eps - x0 for latent video x_t at time t given text tokens."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.video_embed = nn.Linear(config.patch_dim, d)
        self.text_norm = RMSNorm(config.text_dim)
        self.text_embed = nn.Linear(config.text_dim, d)
        self.time_embed = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_text_embed = nn.Sequential(nn.Linear(config.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.shared_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * MOD_ROWS * d))
        self.blocks = nn.ModuleList(
            MMDiTBlock(d, config.num_heads, config.mlp_ratio, context_pre_only=i == config.depth - 1)
            for i in range(config.depth)
        )
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final_proj = nn.Linear(d, config.patch_dim)
        self.attention_impl = "auto"
        # Called after every block, e.g. a cancellation check that raises; not where the whole forward is one graph.
        self.between_blocks: Callable[[], None] | None = None

    def init_weights(self, generator: torch.Generator | None = None, zero_out: bool = True) -> None:
        """Xavier linears. With `zero_out` (training from scratch) gates and output start at zero so every block
        begins as the identity; without it (random-weight smoke runs) they are small random values instead."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                with torch.no_grad():
                    m.weight.uniform_(-bound, bound, generator=generator)
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        with torch.no_grad():
            for module in (self.shared_mod[-1], self.final_mod[-1], self.final_proj):
                module.weight.normal_(0.0, 0.0 if zero_out else 0.02, generator=generator)
                module.bias.zero_()
            for block in self.blocks:
                block.mod_table.normal_(0.0, 0.0 if zero_out else 0.1, generator=generator)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, N, C * pf * ph * pw), tokens in f-major order."""
        pf, ph, pw = self.config.patch_size
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f // pf, pf, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // pf) * (h // ph) * (w // pw), -1)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, C * pf * ph * pw) -> (B, C, F, H, W)."""
        pf, ph, pw = self.config.patch_size
        gf, gh, gw = grid
        b, c = tokens.shape[0], self.config.in_channels
        x = tokens.reshape(b, gf, gh, gw, c, pf, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, gf * pf, gh * ph, gw * pw)

    def condition(self, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The vector every block's modulation is computed from: time embedding + pooled text, (B, D)."""
        weights = text_mask.to(text.dtype)[..., None]  # (B, L, 1)
        pooled = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, Dt)
        t_freq = timestep_embedding(t, self.config.freq_dim).to(text.dtype)
        return self.time_embed(t_freq) + self.pooled_text_embed(pooled)

    def forward(
        self,
        x: torch.Tensor,  # (B, C, F, H, W) noisy latent x_t
        t: torch.Tensor,  # (B,) in [0, 1]
        text: torch.Tensor,  # (B, L, Dt)
        text_mask: torch.Tensor,  # (B, L) bool
        return_features: tuple[int, ...] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Velocity (B, C, F, H, W); with `return_features`, also the video tokens after those block indices."""
        grid = check_inputs(x, text, self.config)
        video = self.video_embed(self.patchify(x))  # (B, Nv, D)
        text_tokens = self.text_embed(self.text_norm(text))  # (B, L, D)
        cond = self.condition(t, text, text_mask)  # (B, D)
        mod = self.shared_mod(cond).unflatten(-1, (2 * MOD_ROWS, -1))  # (B, 12, D)
        rope = rope_3d(grid, self.config.head_dim, self.config.rope_theta, x.device)  # (Nv, Dh/2)
        video_mask = torch.ones(video.shape[:2], dtype=torch.bool, device=x.device)
        key_padding_mask = torch.cat([text_mask.bool(), video_mask], dim=1)  # (B, L + Nv)
        features = []
        for i, block in enumerate(self.blocks):
            video, text_tokens = block(video, text_tokens, mod, rope, key_padding_mask, self.attention_impl)
            if i in return_features:
                features.append(video)
            if not torch.compiler.is_compiling() and self.between_blocks is not None:
                self.between_blocks()
        shift, scale = self.final_mod(cond).chunk(2, dim=-1)
        out = self.unpatchify(self.final_proj(modulate(self.final_norm(video), shift, scale)), grid)
        return (out, features) if return_features else out
