"""Wan2.1 text-to-video generator (WanTransformer3DModel's math) with our MMDiT's call signature, in reading order:
layers, block, config, model, then the key map from diffusers' checkpoint names to ours.

Single stream: each block runs self-attention over video tokens (3D RoPE, QK RMSNorm across heads), cross-attention
to the text tokens (which no block updates) and a gelu-tanh MLP. Modulation comes from the timestep alone: one shared
projection to six rows plus a per-block (1, 6, D) table, applied in fp32 with fp32 gated residual adds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aptserve import kernels
from aptserve.engines.dit import Attention, Mlp, RMSNorm, attend, check_inputs, rope_3d, timestep_embedding

# Modules kept out of FP8 (the quantiser's skip prefixes): embeddings, the shared modulation and the final layer.
# Per-block and final tables are parameters, not linears, so they are never touched.
WAN_SKIP = ("patch_embedding", "text_embed", "time_embed", "time_mod", "final_proj")

MOD_ROWS = 6  # shift/scale/gate for self-attention, then for the MLP

# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


def wan_rope(grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(cos, sin) stacked, (2, N, head_dim // 2) in fp32, for an (F, H, W) token grid flattened f-major.

    Our 3D split and consecutive-pair layout; angles in fp64, rounded to fp32 after cos/sin, as Wan does (fp32
    angles would drift by ~1e-5 at positions near 100)."""
    angles = rope_3d(grid, head_dim, theta, device, dtype=torch.float64)  # (N, head_dim // 2)
    return torch.stack([angles.cos(), angles.sin()]).float()


def rotate_pairs(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, H, N, D) by the (cos, sin) tables (2, N, D/2), in fp32."""
    x2 = x.float().unflatten(-1, (-1, 2))  # (B, H, N, D/2, 2)
    cos, sin = rope.unbind(0)
    out = torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the module's dtype; returns fp32 (callers cast where Wan does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, N, D) -> (B, H, N, Dh)


class SelfAttention(nn.Module):
    """Video self-attention: fused qkv, RMSNorm of q and k across all heads (weights of size D), 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim, eps)
        self.k_norm = RMSNorm(dim, eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attention_impl: Attention) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, D) each
        q = rotate_pairs(split_heads(self.q_norm(q), self.num_heads), rope)  # (B, H, N, Dh)
        k = rotate_pairs(split_heads(self.k_norm(k), self.num_heads), rope)
        out = attend(q, k, split_heads(v, self.num_heads), None, attention_impl)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, D)


class CrossAttention(nn.Module):
    """Video queries attend to every text token, padding included (Wan uses no mask); no RoPE, no modulation."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim, eps)
        self.k_norm = RMSNorm(dim, eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, attention_impl: str) -> torch.Tensor:
        q = split_heads(self.q_norm(self.q(x)), self.num_heads)  # (B, H, Nv, Dh)
        k, v = self.kv(text).chunk(2, dim=-1)  # (B, L, D) each
        k, v = split_heads(self.k_norm(k), self.num_heads), split_heads(v, self.num_heads)
        out = kernels.attention(q, k, v, None, impl=attention_impl)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, Nv, D)


# ---------------------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------------------


class WanBlock(nn.Module):
    """Self-attention, cross-attention, MLP. Modulated norms and gated residual adds run in fp32, then return to
    the model dtype, as Wan does; the cross-attention residual add stays in the model dtype (also as Wan does)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.mod_table = nn.Parameter(torch.zeros(1, MOD_ROWS, dim))
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_norm = FP32LayerNorm(dim, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.mlp = Mlp(dim, ffn_dim)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D)
        text: torch.Tensor,  # (B, L, D)
        mod: torch.Tensor,  # (B, 6, D) shared time modulation
        rope: torch.Tensor,  # (2, N, Dh / 2)
        attention_impl: str,
        self_attention: Attention | None = None,  # in place of attention_impl for the self-attention only
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.mod_table.float() + mod.float()).unbind(1)  # (B, D)
        h = (self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None]).to(x.dtype)
        x = (x.float() + self.self_attn(h, rope, self_attention or attention_impl) * gate1[:, None]).to(x.dtype)
        x = x + self.cross_attn(self.cross_norm(x).to(x.dtype), text, attention_impl)
        h = (self.norm3(x) * (1 + scale2[:, None]) + shift2[:, None]).to(x.dtype)
        return (x.float() + self.mlp(h).float() * gate2[:, None]).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanConfig:
    """Generator shape, named after diffusers' WanTransformer3DModel config where the two differ only in name
    (depth = num_layers, hidden_size = num_heads * attention_head_dim). `text_len` is the length Wan zero-pads
    prompts to (its tokenizer's 512): the padding tokens are attended to, so it is part of the model."""

    depth: int
    hidden_size: int
    num_heads: int
    ffn_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        sizes = (self.depth, self.hidden_size, self.num_heads, self.ffn_dim, self.in_channels, self.out_channels)
        if min(sizes) < 1 or min(self.text_dim, self.text_len, self.freq_dim) < 1:
            raise ValueError(
                "depth, hidden_size, num_heads, ffn_dim, in/out channels, text_dim, text_len, freq_dim must be >= 1; "
                f"got {(*sizes, self.text_dim, self.text_len, self.freq_dim)}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2 or head_dim < 12:
            raise ValueError(f"head dim {head_dim} is too small or odd for 3D RoPE (needs an even value >= 12)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even (cos and sin halves)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints; got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)


WAN_PRESETS: dict[str, WanConfig] = {
    "wan-tiny": WanConfig(depth=2, hidden_size=64, num_heads=4, ffn_dim=128, text_dim=32, text_len=16, freq_dim=32),
    "wan2.1-1.3b": WanConfig(depth=30, hidden_size=1536, num_heads=12, ffn_dim=8960),
    "wan2.1-14b": WanConfig(depth=40, hidden_size=5120, num_heads=40, ffn_dim=13824),
}


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class WanTransformer(nn.Module):
    """Predicts the flow-matching velocity v = eps - x0 for latent video x_t at time t given text tokens."""

    fp8_skip = WAN_SKIP
    # Kept in fp32 whatever the model dtype (diffusers' _keep_in_fp32_modules under our names): the time embedding
    # and the modulation tables, whose bf16 rounding shifts every modulated activation, and the cross-attention norm.
    keep_fp32 = ("time_embed.", "mod_table", "final_table", "cross_norm.")

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embedding = nn.Conv3d(config.in_channels, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embed = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embed = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, MOD_ROWS * d))
        self.blocks = nn.ModuleList(
            WanBlock(d, config.num_heads, config.ffn_dim, config.eps) for _ in range(config.depth)
        )
        self.final_norm = FP32LayerNorm(d, config.eps, elementwise_affine=False)
        self.final_table = nn.Parameter(torch.zeros(1, 2, d))  # shift, scale; added to the time embedding directly
        self.final_proj = nn.Linear(d, config.patch_volume * config.out_channels)  # rows ordered (pt, ph, pw, C)
        self.attention_impl = "auto"
        self.between_blocks: Callable[[], None] | None = None  # as MMDiT's: called after every block

    def init_weights(self, generator: torch.Generator | None = None, zero_out: bool = True) -> None:
        """Xavier linears and convs, unit norms. With `zero_out` (training from scratch) the output projection and
        the modulation start at zero; without it (random-weight smoke runs) they are small random values."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                fan_out, fan_in = m.weight.shape[0], m.weight[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                with torch.no_grad():
                    m.weight.uniform_(-bound, bound, generator=generator)
                    m.bias.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for module in (self.time_mod[-1], self.final_proj):
                module.weight.normal_(0.0, 0.0 if zero_out else 0.02, generator=generator)
            for table in [self.final_table, *(block.mod_table for block in self.blocks)]:
                table.normal_(0.0, 0.0 if zero_out else 0.1, generator=generator)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, pf * ph * pw * C) in Wan's (pt, ph, pw, C) order -> (B, C, F, H, W)."""
        pf, ph, pw = self.config.patch_size
        gf, gh, gw = grid
        x = tokens.reshape(tokens.shape[0], gf, gh, gw, pf, ph, pw, self.config.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], -1, gf * pf, gh * ph, gw * pw)

    def pad_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Our (text, mask) as Wan's input: masked tokens become zero vectors and zero rows pad to `text_len`.

        Wan's pipeline keeps a prompt's real tokens and zero-pads to 512 with no attention mask; text carries no
        position in cross-attention, so zeroing masked rows wherever they sit gives exactly that. (B, text_len, Dt)."""
        length = text.shape[1]
        if length > self.config.text_len:
            raise ValueError(f"text has {length} tokens; this model takes at most {self.config.text_len}")
        text = torch.where(text_mask.bool()[..., None], text, torch.zeros((), dtype=text.dtype, device=text.device))
        return F.pad(text, (0, 0, 0, self.config.text_len - length))

    def forward(
        self,
        x: torch.Tensor,  # (B, C, F, H, W) noisy latent x_t
        t: torch.Tensor,  # (B,) in [0, 1]
        text: torch.Tensor,  # (B, L, Dt), L <= text_len
        text_mask: torch.Tensor,  # (B, L) bool
        return_features: tuple[int, ...] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Velocity (B, C, F, H, W); with `return_features`, also the video tokens after those block indices."""
        grid = check_inputs(x, text, self.config)
        video = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        text_tokens = self.text_embed(self.pad_text(text, text_mask))  # (B, text_len, D)
        # Wan's timestep input is 1000 * sigma: timestep_embedding applies that factor to our t in [0, 1].
        t_freq = timestep_embedding(t, self.config.freq_dim).to(self.time_embed[0].weight.dtype)  # (B, freq_dim)
        temb = self.time_embed(t_freq).to(text_tokens.dtype)  # (B, D)
        mod = self.time_mod(temb).unflatten(-1, (MOD_ROWS, -1))  # (B, 6, D)
        rope = wan_rope(grid, self.config.head_dim, self.config.rope_theta, x.device)  # (2, N, Dh/2)
        features = []
        for i, block in enumerate(self.blocks):
            video = block(video, text_tokens, mod, rope, self.attention_impl)
            if i in return_features:
                features.append(video)
            if not torch.compiler.is_compiling() and self.between_blocks is not None:
                self.between_blocks()
        shift, scale = (self.final_table.float() + temb.float()[:, None]).unbind(1)  # (B, D) each
        video = (self.final_norm(video) * (1 + scale[:, None]) + shift[:, None]).to(video.dtype)
        out = self.unpatchify(self.final_proj(video), grid)
        return (out, features) if return_features else out


# ---------------------------------------------------------------------------------------------------------------
# Key map: diffusers WanTransformer3DModel -> WanTransformer
# ---------------------------------------------------------------------------------------------------------------

# Diffusers module path (without "blocks.N.") -> ours; a (name, index, parts) value is one slice of a fused tensor.
_TOP_KEYS: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embed.0",
    "condition_embedder.text_embedder.linear_2": "text_embed.2",
    "condition_embedder.time_embedder.linear_1": "time_embed.0",
    "condition_embedder.time_embedder.linear_2": "time_embed.2",
    "condition_embedder.time_proj": "time_mod.1",
    "scale_shift_table": "final_table",
    "proj_out": "final_proj",
}
_BLOCK_KEYS: dict[str, str | tuple[str, int, int]] = {
    "scale_shift_table": "mod_table",
    "attn1.to_q": ("self_attn.qkv", 0, 3),
    "attn1.to_k": ("self_attn.qkv", 1, 3),
    "attn1.to_v": ("self_attn.qkv", 2, 3),
    "attn1.norm_q": "self_attn.q_norm",
    "attn1.norm_k": "self_attn.k_norm",
    "attn1.to_out.0": "self_attn.proj",
    "norm2": "cross_norm",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": ("cross_attn.kv", 0, 2),
    "attn2.to_v": ("cross_attn.kv", 1, 2),
    "attn2.norm_q": "cross_attn.q_norm",
    "attn2.norm_k": "cross_attn.k_norm",
    "attn2.to_out.0": "cross_attn.proj",
    "ffn.net.0.proj": "mlp.fc1",
    "ffn.net.2": "mlp.fc2",
}
_BLOCK_PREFIX = re.compile(r"(blocks\.\d+\.)(.*)")


def _rename(key: str) -> str | tuple[str, int, int]:
    """One diffusers key -> our key, or (our fused key, slice index, slice count). Unknown keys raise KeyError."""
    match = _BLOCK_PREFIX.fullmatch(key)
    prefix, local = match.groups() if match else ("", key)
    table = _BLOCK_KEYS if match else _TOP_KEYS
    module, dot, leaf = local.rpartition(".")
    if local in table:  # a bare parameter such as scale_shift_table
        module, dot, leaf = local, "", ""
    if module not in table:
        raise KeyError(f"no mapping for diffusers key {key!r} (Wan2.1 T2V layout expected)")
    target = table[module]
    if isinstance(target, tuple):
        return f"{prefix}{target[0]}{dot}{leaf}", target[1], target[2]
    return f"{prefix}{target}{dot}{leaf}"


def diffusers_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers WanTransformer3DModel (Wan2.1 T2V) state dict onto `WanTransformer`'s names.

    Separate q/k/v (and cross-attention k/v) are concatenated into our fused projections; everything else is a
    rename. Every input tensor is used exactly once and every fused tensor is complete, or this raises."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    parts_of: dict[str, int] = {}
    for key, value in state_dict.items():
        target = _rename(key)
        if isinstance(target, tuple):
            name, index, parts = target
            slices = fused.setdefault(name, {})
            if index in slices:
                raise ValueError(f"{key!r} fills slice {index} of {name!r} twice")
            slices[index], parts_of[name] = value, parts
        elif target in out:
            raise ValueError(f"two diffusers keys map to {target!r}")
        else:
            out[target] = value
    for name, slices in fused.items():
        if sorted(slices) != list(range(parts_of[name])):
            raise ValueError(f"{name!r} needs {parts_of[name]} slices; got {sorted(slices)}")
        out[name] = torch.cat([slices[i] for i in range(parts_of[name])], dim=0)
    return out
