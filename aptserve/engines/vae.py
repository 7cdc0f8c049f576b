"""Causal 3D convolutional video VAE (Wan-VAE-like, written from scratch): 4x temporal, 8x8 spatial, 16 channels.

The first frame is coded alone, so F = 4*L - 3 frames <-> L latent frames; decoding streams one latent frame at a
time with the causal-conv history carried in an explicit `DecodeCache`. After `vae.to(memory_format=
torch.channels_last_3d)` every activation stays channels-last (NDHWC), the layout cuDNN's fastest 3D convs use.
`VAEConfig(layout="wan2.1")` builds Wan2.1's own VAE layout (weights via `engines.wan_vae.diffusers_vae_to_ours`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per streaming layer (keyed by its module path), the last input frames it saw. A layer with no entry is at the
# start of the video: its past is zeros and, for the temporal resamplers, its first frame is the lone frame 0.
ConvCache = Mapping[str, Tensor]

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4

# PyTorch runs a CPU conv3d with B*C*T*H at or below this on a ~10x slower kernel than oneDNN: every streaming
# chunk (T of 3 to 6) lands there, though its H*W is large.
_CPU_SLOW_CONV3D_MAX = 20480


# ----------------------------------------------------------------------------------------------------------------------
# Layers


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last_3d if x (B, C, T, H, W) is laid out NDHWC (and not also plain contiguous), else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# (latent_mean, latent_std, first_frames_mean, first_frames_std) as VAEConfig holds them
LatentNormalisation = tuple[
    float | tuple[float, ...], float | tuple[float, ...], tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]
]


def _broadcastable(value: float | tuple[float, ...], like: Tensor) -> Tensor | float:
    """A scalar as is; per-channel values as a (1, C, 1, 1, 1) tensor on `like`'s device and dtype."""
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    return value


def normalisation_tensors(
    norm: LatentNormalisation, like: Tensor, first_frame: int = 0
) -> tuple[Tensor | float, Tensor | float]:
    """(mean, std) of `norm` ready to broadcast against (B, C, F, h, w) latents like `like` whose first frame is
    latent frame `first_frame` of its clip: scalars or (1, C, 1, 1, 1) when no frame is normalised apart, else
    (1, C, F, 1, 1) with the first frames' own statistics."""
    mean, std, head_mean, head_std = norm
    if first_frame >= len(head_std):
        return _broadcastable(mean, like), _broadcastable(std, like)
    frames, channels = like.shape[2], like.shape[1]

    def per_frame(base: float | tuple[float, ...], head: tuple[tuple[float, ...], ...]) -> Tensor:
        rest = base if isinstance(base, tuple) else (base,) * channels
        rows = [head[f] if f < len(head) else rest for f in range(first_frame, first_frame + frames)]
        return torch.tensor(rows, dtype=like.dtype, device=like.device).t().reshape(1, channels, frames, 1, 1)

    return per_frame(mean, head_mean), per_frame(std, head_std)


def _conv3d(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """conv(x) in x's memory format (CPU convs return NCDHW even for NDHWC inputs; cuDNN keeps NDHWC), with short
    CPU clips run as the same conv with time as the last axis to reach the fast kernel."""
    fmt = memory_format_of(x)
    B, C, T, H, W = x.shape
    if not x.is_cpu or B > 1 or B * C * T * H > _CPU_SLOW_CONV3D_MAX or B * C * H * W <= _CPU_SLOW_CONV3D_MAX:
        return conv._conv_forward(x, conv.weight, conv.bias).contiguous(memory_format=fmt)
    time_last = (1, 2, 0)  # (T, H, W) order of padding/stride/dilation -> (H, W, T)
    y = F.conv3d(
        x.permute(0, 1, 3, 4, 2),  # (B, C, H, W, T)
        conv.weight.permute(0, 1, 3, 4, 2),
        conv.bias,
        stride=tuple(conv.stride[i] for i in time_last),
        padding=tuple(conv.padding[i] for i in time_last),
        dilation=tuple(conv.dilation[i] for i in time_last),
    )
    return y.permute(0, 1, 4, 2, 3).contiguous(memory_format=fmt)  # (B, C_out, T, H, W)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each voxel: unlike GroupNorm it never mixes frames, so it stays causal.

    With `l2_eps` set it takes Wan2.1's form x / max(|x|, l2_eps) * sqrt(C), the eps on the norm rather than on the
    mean of squares (on trained Wan weights the difference alone costs 1e-4 of error)."""

    def __init__(self, channels: int, eps: float = 1e-6, l2_eps: float | None = None):
        super().__init__()
        self.eps = eps
        self.l2_eps = l2_eps
        self.scale = channels**0.5
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        xf = x.float()  # the mean of squares overflows or loses precision in half types
        if self.l2_eps is None:
            xf = xf * torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + self.eps)
        else:
            xf = F.normalize(xf, dim=1, eps=self.l2_eps) * self.scale
        return xf.to(x.dtype) * self.weight.view(1, -1, 1, 1, 1)


Norm = Callable[[int], nn.Module]  # channels -> norm layer; Wan2.1's layout passes ChannelRMSNorm with l2_eps


class CausalConv3d(nn.Conv3d):
    """3D conv padded in time on the past side only, so output frame t sees input frames <= t.

    With a cache dict the past comes from the previous chunk instead of zeros, and the new dict holds this chunk's
    last (kernel_t - 1) input frames; with cache None (whole-sequence path) nothing is recorded.
    """

    cache_key: str = ""  # set from the module path by `_assign_cache_keys`

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.past_frames = kt - 1

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> tuple[Tensor, ConvCache | None]:
        if self.past_frames == 0:
            return _conv3d(self, x), cache
        past = None if cache is None else cache.get(self.cache_key)
        if past is None:
            B, C, _, H, W = x.shape
            past = torch.zeros(B, C, self.past_frames, H, W, dtype=x.dtype, device=x.device)
            past = past.contiguous(memory_format=memory_format_of(x))
        x = torch.cat([past, x], dim=2)  # (B, C, past + T, H, W)
        if cache is not None:  # clone so the cache does not pin the whole concatenated chunk
            cache = {**cache, self.cache_key: x[:, :, -self.past_frames :].clone()}
        return _conv3d(self, x), cache


class ResBlock3d(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convs; a 1x1x1 shortcut conv when it changes the channel count."""

    def __init__(self, channels: int, out_channels: int | None = None, norm: Norm = ChannelRMSNorm):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = norm(channels)
        self.conv1 = CausalConv3d(channels, out_channels, 3)
        self.norm2 = norm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.shortcut = CausalConv3d(channels, out_channels, 1) if out_channels != channels else None

    def forward(self, x: Tensor, cache: ConvCache | None) -> tuple[Tensor, ConvCache | None]:
        h, cache = self.conv1(F.silu(self.norm1(x)), cache)
        h, cache = self.conv2(F.silu(self.norm2(h)), cache)
        skip = x if self.shortcut is None else self.shortcut(x)[0]  # a 1x1x1 conv keeps no history
        return skip + h, cache  # (B, C_out, T, H, W)


class SpatialAttention(nn.Module):
    """Single-head self-attention within each frame: global spatial context without looking ahead in time."""

    def __init__(self, channels: int, norm: Norm = ChannelRMSNorm):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(B * T, 1, H * W, C)  # (B*T, 1, H*W, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = self.proj(F.scaled_dot_product_attention(q, k, v))  # (B*T, 1, H*W, C)
        return x + out.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)


class TemporalDownsample(nn.Module):
    """Halve time keeping frame 0 alone: 1 + 2n frames -> 1 + n, output j >= 1 from input frames 2j-2..2j."""

    cache_key: str = ""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: ConvCache | None) -> tuple[Tensor, ConvCache | None]:
        past = None if cache is None else cache.get(self.cache_key)
        if past is None:  # start of the video: frame 0 passes through and is the past of the stride-2 windows
            head, seq = x[:, :, :1], x
        else:  # a chunk of an even number of frames, preceded by the last frame of the previous one
            head, seq = x[:, :, :0], torch.cat([past, x], dim=2)
        if cache is not None:
            cache = {**cache, self.cache_key: seq[:, :, -1:].clone()}
        if seq.shape[2] < 3:
            return head, cache
        return torch.cat([head, self.conv(seq)], dim=2), cache  # (B, C, 1 + T // 2, H, W) at the start


class TemporalUpsample(nn.Module):
    """Double time keeping frame 0 alone: a causal conv makes 2x channels that unfold into 2 frames per frame.

    With `zero_first_history` frame 0 is zeros in the conv's past too, as in Wan2.1 (its "Rep" cache marker)."""

    def __init__(self, channels: int, zero_first_history: bool = False):
        super().__init__()
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1))
        self.zero_first_history = zero_first_history

    def forward(self, x: Tensor, cache: ConvCache | None) -> tuple[Tensor, ConvCache | None]:
        starts_video = cache is None or self.time_conv.cache_key not in cache
        history = x
        if starts_video and self.zero_first_history:
            history = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:]], dim=2)
        y, cache = self.time_conv(history, cache)  # (B, 2C, T, H, W)
        y = _unfold_time(y)  # (B, C, 2T, H, W)
        if starts_video:  # frame 0 is passed through once instead of being doubled
            y = x[:, :, :1] if y.shape[2] == 2 else torch.cat([x[:, :, :1], y[:, :, 2:]], dim=2)
        return y, cache  # (B, C, 2T - 1 or 2T, H, W)


def _unfold_time(y: Tensor) -> Tensor:
    """(B, 2C, T, H, W) -> (B, C, 2T, H, W): channel half i becomes output frame 2t + i. One copy in either layout."""
    B, C2, T, H, W = y.shape
    if memory_format_of(y) == torch.channels_last_3d:
        y = y.permute(0, 2, 3, 4, 1).view(B, T, H, W, 2, C2 // 2).permute(0, 1, 4, 2, 3, 5)  # (B, T, 2, H, W, C)
        return y.contiguous().view(B, 2 * T, H, W, C2 // 2).permute(0, 4, 1, 2, 3)  # NDHWC memory
    return y.view(B, 2, C2 // 2, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C2 // 2, 2 * T, H, W)


class Downsample(nn.Module):
    """Stride-2 spatial conv per frame (changing channels), then optional temporal halving."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, 2, 2))
        self.time = TemporalDownsample(out_channels) if temporal else None

    def forward(self, x: Tensor, cache: ConvCache | None) -> tuple[Tensor, ConvCache | None]:
        # Pad right/bottom only, as a stride-2 3x3 needs, so even sizes halve exactly.
        x = _conv3d(self.conv, F.pad(x, (0, 1, 0, 1)))  # (B, C_out, T, H/2, W/2)
        if self.time is not None:
            x, cache = self.time(x, cache)
        return x, cache


class Upsample(nn.Module):
    """Optional temporal doubling (at the cheaper low resolution), then nearest 2x spatial and a conv per frame."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, zero_first_history: bool = False):
        super().__init__()
        self.time = TemporalUpsample(in_channels, zero_first_history) if temporal else None
        self.conv = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: Tensor, cache: ConvCache | None) -> tuple[Tensor, ConvCache | None]:
        if self.time is not None:
            x, cache = self.time(x, cache)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # (B, C_in, T, 2H, 2W)
        return _conv3d(self.conv, x), cache


# ----------------------------------------------------------------------------------------------------------------------
# Blocks


class Stage(nn.Module):
    """Residual blocks at one resolution (the first one from `in_channels`), then an optional resample."""

    def __init__(
        self,
        channels: int,
        num_blocks: int,
        resample: nn.Module | None,
        in_channels: int | None = None,
        norm: Norm = ChannelRMSNorm,
    ):
        super().__init__()
        widths = [in_channels or channels] + [channels] * (num_blocks - 1)
        self.blocks = nn.ModuleList(ResBlock3d(width, channels, norm) for width in widths)
        self.resample = resample

    def forward(self, x: Tensor, cache: ConvCache | None) -> tuple[Tensor, ConvCache | None]:
        for block in self.blocks:
            x, cache = block(x, cache)
        if self.resample is not None:
            x, cache = self.resample(x, cache)
        return x, cache


class MidBlock(nn.Module):
    """ResBlock, optional per-frame attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, norm: Norm = ChannelRMSNorm):
        super().__init__()
        self.block1 = ResBlock3d(channels, norm=norm)
        self.attn = SpatialAttention(channels, norm) if attention else None
        self.block2 = ResBlock3d(channels, norm=norm)

    def forward(self, x: Tensor, cache: ConvCache | None) -> tuple[Tensor, ConvCache | None]:
        x, cache = self.block1(x, cache)
        if self.attn is not None:
            x = self.attn(x)
        return self.block2(x, cache)


def _norm_for(config: VAEConfig) -> Norm:
    return partial(ChannelRMSNorm, l2_eps=WAN_NORM_EPS) if config.wan_layout else ChannelRMSNorm


def _assign_cache_keys(root: nn.Module) -> None:
    """Key each streaming layer by its module path, stable from one chunk (and one process) to the next."""
    for name, module in root.named_modules():
        if isinstance(module, (CausalConv3d, TemporalDownsample)):
            module.cache_key = name


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)  # 4 resolutions: 3 downsamples, time halved at the last two
    num_res_blocks: int = 1
    decoder_base_channels: int | None = None  # None = base_channels
    decoder_res_blocks: int | None = None  # None = num_res_blocks
    mid_attention: bool = False
    # "aptserve": channels change in the resample convs. "wan2.1": AutoencoderKLWan 2.1's layout, loadable with
    # `diffusers_vae_to_ours`: channels change in a stage's first res block (1x1x1 shortcut conv) and the decoder's
    # upsample convs halve the width; 1x1x1 quant convs around the latent; frame 0 is zeros in the temporal
    # upsamplers' history; the norm's eps sits on the L2 norm; decoded video is clamped to [-1, 1].
    layout: str = "aptserve"
    # encode returns (mu - latent_mean) / latent_std: one scalar each, or one value per latent channel
    latent_mean: float | tuple[float, ...] = 0.0
    latent_std: float | tuple[float, ...] = 1.0
    # Per-channel statistics for each of the first latent frames apart (frame k uses row k; later frames use
    # latent_mean/latent_std). A causal VAE encodes frame 0 alone, and its first latent frames are much quieter
    # than the rest: under one shared scale the same noise level buries them long before the others.
    first_frames_mean: tuple[tuple[float, ...], ...] = ()
    first_frames_std: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        counts = {"in_channels": self.in_channels, "latent_channels": self.latent_channels}
        counts |= {"base_channels": self.base_channels, "num_res_blocks": self.num_res_blocks}
        counts |= {"decoder_base_channels": self.decoder_base_channels, "decoder_res_blocks": self.decoder_res_blocks}
        for name, value in counts.items():
            if value is not None and value < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {value}")
        if len(self.channel_mults) != 4 or min(self.channel_mults) < 1:
            raise ValueError(
                f"VAEConfig.channel_mults must be 4 integers >= 1 (8x spatial, 4x temporal), got {self.channel_mults}"
            )
        if self.layout not in VAE_LAYOUTS:
            raise ValueError(f"VAEConfig.layout must be one of {VAE_LAYOUTS}, got {self.layout!r}")
        if self.wan_layout and any(c % 2 for c in self.decoder_channels[:3]):
            raise ValueError(f"the wan2.1 layout halves decoder widths, which must be even: {self.decoder_channels}")
        for name in ("latent_mean", "latent_std"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.latent_channels:
                raise ValueError(
                    f"VAEConfig.{name} must be one number or one per latent channel ({self.latent_channels}), "
                    f"got {len(value)} values"
                )
        stds = self.latent_std if isinstance(self.latent_std, tuple) else (self.latent_std,)
        if not all(s > 0 for s in stds):
            raise ValueError(f"VAEConfig.latent_std must be > 0, got {self.latent_std}")
        for name in ("first_frames_mean", "first_frames_std"):  # JSON gives lists of lists
            object.__setattr__(self, name, tuple(tuple(float(v) for v in row) for row in getattr(self, name)))
        if len(self.first_frames_mean) != len(self.first_frames_std):
            raise ValueError(
                f"VAEConfig.first_frames_mean and first_frames_std must cover the same frames, got "
                f"{len(self.first_frames_mean)} and {len(self.first_frames_std)}"
            )
        for row in self.first_frames_mean + self.first_frames_std:
            if len(row) != self.latent_channels:
                raise ValueError(
                    f"VAEConfig.first_frames_mean/std rows must hold one value per latent channel "
                    f"({self.latent_channels}), got {len(row)}"
                )
        if not all(s > 0 for row in self.first_frames_std for s in row):
            raise ValueError(f"VAEConfig.first_frames_std must be > 0, got {self.first_frames_std}")

    @property
    def normalisation(self) -> LatentNormalisation:
        """Everything that maps raw latents to normalised ones; equal normalisations mean the same latent space."""
        return (self.latent_mean, self.latent_std, self.first_frames_mean, self.first_frames_std)

    def latent_statistics(self, like: Tensor, first_frame: int = 0) -> tuple[Tensor | float, Tensor | float]:
        """(mean, std) ready to broadcast against (B, C, F, h, w) tensors like `like`, whose first frame is latent
        frame `first_frame` of the clip (streaming decode passes later frames alone)."""
        return normalisation_tensors(self.normalisation, like, first_frame)

    @property
    def wan_layout(self) -> bool:
        return self.layout == "wan2.1"

    @property
    def spatial_factor(self) -> int:
        return SPATIAL_FACTOR

    @property
    def temporal_factor(self) -> int:
        return TEMPORAL_FACTOR

    @property
    def encoder_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Per decoder stage, lowest resolution first."""
        base = self.decoder_base_channels or self.base_channels
        return tuple(base * m for m in reversed(self.channel_mults))

    @property
    def decoder_blocks(self) -> int:
        return self.decoder_res_blocks or self.num_res_blocks

    def frames_for_latents(self, num_latents: int) -> int:
        if num_latents < 1:
            raise ValueError(f"need at least 1 latent frame, got {num_latents}")
        return TEMPORAL_FACTOR * num_latents - (TEMPORAL_FACTOR - 1)

    def latents_for_frames(self, num_frames: int) -> int:
        if num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR != 0:
            raise ValueError(f"frame count must be 4*L - 3 (1, 5, ..., 49, ...), got {num_frames}")
        return (num_frames - 1) // TEMPORAL_FACTOR + 1


VAE_LAYOUTS = ("aptserve", "wan2.1")
WAN_NORM_EPS = 1e-12  # F.normalize's default, as Wan's RMS_norm uses it

# AutoencoderKLWan 2.1's per-channel latent statistics (its config's latents_mean / latents_std)
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508)
WAN21_LATENT_MEAN += (0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743)
WAN21_LATENT_STD += (3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

VAE_PRESETS: dict[str, VAEConfig] = {
    # CPU default: decodes 13x8x8 latents to 49x64x64 frames in well under a second on 2 cores.
    "tiny": VAEConfig(base_channels=16, channel_mults=(1, 2, 4, 4), num_res_blocks=1),
    # Wan2.1-VAE-sized (96 * (1, 2, 4, 4), 2 encoder / 3 decoder blocks per stage as Wan has): realistic cost.
    "wan": VAEConfig(base_channels=96, num_res_blocks=2, decoder_res_blocks=3, mid_attention=True),
    # Wan encoder with an APT2-style light decoder: 64 * (1, 2, 4, 4) = 64/128/256/256 channels (APT2 went to 512
    # at the lowest resolution; 256 keeps the cheap end cheap) and 2 blocks per stage.
    "wan-light": VAEConfig(
        base_channels=96, num_res_blocks=2, decoder_base_channels=64, decoder_res_blocks=2, mid_attention=True
    ),
    # Wan2.1's VAE itself (126.9M parameters): load its diffusers weights with `diffusers_vae_to_ours`.
    "wan2.1": VAEConfig(
        layout="wan2.1",
        base_channels=96,
        num_res_blocks=2,
        decoder_res_blocks=3,
        mid_attention=True,
        latent_mean=WAN21_LATENT_MEAN,
        latent_std=WAN21_LATENT_STD,
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Model


class Encoder(nn.Module):
    """(B, 3, F, H, W) -> (B, 2*latent, L, H/8, W/8) posterior moments; latent j sees frames 0..4j only."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, wan, norm = config.encoder_channels, config.wan_layout, _norm_for(config)
        # wan2.1: stage i goes from ins[i] to ch[i] in its first block and downsamples at ch[i]
        ins = (config.base_channels, *ch[:3]) if wan else ch
        outs = ch if wan else ch[1:]
        self.stem = CausalConv3d(config.in_channels, ins[0], 3)
        self.stages = nn.ModuleList(
            Stage(
                ch[i],
                config.num_res_blocks,
                Downsample(ch[i], outs[i], temporal=i >= 1) if i < 3 else None,
                in_channels=ins[i],
                norm=norm,
            )
            for i in range(4)
        )
        self.mid = MidBlock(ch[-1], config.mid_attention, norm)
        self.head_norm = norm(ch[-1])
        self.head = CausalConv3d(ch[-1], 2 * config.latent_channels, 3)
        self.quant_conv = CausalConv3d(2 * config.latent_channels, 2 * config.latent_channels, 1) if wan else None
        _assign_cache_keys(self)

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> tuple[Tensor, ConvCache | None]:
        x, cache = self.stem(x, cache)  # (B, C0, F, H, W)
        for stage in self.stages:
            x, cache = stage(x, cache)  # -> (B, C3, L, H/8, W/8)
        x, cache = self.mid(x, cache)
        x, cache = self.head(F.silu(self.head_norm(x)), cache)  # (B, 2*latent, L, H/8, W/8)
        return (x, cache) if self.quant_conv is None else self.quant_conv(x, cache)


class Decoder(nn.Module):
    """(B, latent, L, h, w) -> (B, 3, 4L-3, 8h, 8w) on the whole sequence, or -> 1 / 4 frames per chunk with a cache."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, wan, norm, latent = config.decoder_channels, config.wan_layout, _norm_for(config), config.latent_channels
        # wan2.1: stage i runs at ch[i] from ins[i] (its first block doubles the halved width) and upsamples to half
        outs = tuple(c // 2 for c in ch) if wan else ch[1:]
        ins = (ch[0], *outs[:3]) if wan else ch
        self.post_quant_conv = CausalConv3d(latent, latent, 1) if wan else None
        self.stem = CausalConv3d(latent, ch[0], 3)
        self.mid = MidBlock(ch[0], config.mid_attention, norm)
        self.stages = nn.ModuleList(
            Stage(
                ch[i],
                config.decoder_blocks,
                Upsample(ch[i], outs[i], temporal=i < 2, zero_first_history=wan) if i < 3 else None,
                in_channels=ins[i],
                norm=norm,
            )
            for i in range(4)
        )
        self.head_norm = norm(ch[-1])
        self.head = CausalConv3d(ch[-1], config.in_channels, 3)
        _assign_cache_keys(self)

    def forward(self, z: Tensor, cache: ConvCache | None = None) -> tuple[Tensor, ConvCache | None]:
        if self.post_quant_conv is not None:
            z, cache = self.post_quant_conv(z, cache)
        x, cache = self.stem(z, cache)  # (B, C0, L, h, w)
        x, cache = self.mid(x, cache)
        for stage in self.stages:
            x, cache = stage(x, cache)  # -> (B, C3, 4L-3, 8h, 8w)
        return self.head(F.silu(self.head_norm(x)), cache)  # (B, 3, 4L-3, 8h, 8w)


@dataclass(frozen=True)
class DecodeCache:
    """Streaming decode state: per causal layer its last input frames, and how many latent frames went in so far.

    `decode_chunk` never mutates a cache; it returns a new one, so a cache can be kept and resumed more than once.
    """

    convs: ConvCache = field(default_factory=dict)
    latent_frames_decoded: int = 0


class CausalVAE(nn.Module):
    """Video <-> normalised latents; whole-sequence encode/decode plus streaming decode with an explicit cache."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.init_weights()

    def init_weights(self) -> None:
        """LeCun-normal convs behind every RMS norm keep each branch near unit scale; attention starts as identity."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ChannelRMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, SpatialAttention):
                nn.init.zeros_(module.proj.weight)

    def encode_distribution(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (unnormalised) posterior mean and log-variance, each (B, latent, L, H/8, W/8)."""
        self._check_video(video)
        moments, _ = self.encoder(video)  # (B, 2*latent, L, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite for an untrained or diverging encoder

    def encode(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latent; posterior mean, or a sample when given a generator."""
        mean, logvar = self.encode_distribution(video)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        latent_mean, latent_std = self.config.latent_statistics(mean)
        return (mean - latent_mean) / latent_std

    @property
    def channels_last(self) -> bool:
        """Whether the decoder was converted with `.to(memory_format=torch.channels_last_3d)`: then decoding feeds it
        NDHWC latents and every activation (and the returned video) keeps that layout."""
        return memory_format_of(self.decoder.stem.weight) == torch.channels_last_3d

    def decode(self, latent: Tensor) -> Tensor:
        """(B, latent, L, h, w) normalised -> (B, 3, 4L-3, 8h, 8w) in one pass over the time axis; unclamped but
        in the wan2.1 layout, which clamps to [-1, 1] as Wan does."""
        self._check_latent(latent)
        video, _ = self.decoder(self._decoder_input(latent))
        return self._finish(video)

    def init_decode_cache(self) -> DecodeCache:
        return DecodeCache()

    def decode_chunk(self, latent_frame: Tensor, cache: DecodeCache) -> tuple[Tensor, DecodeCache]:
        """Decode the next latent frame(s) (B, latent, T, h, w): 1 + 4(T-1) frames on the first call, 4T after."""
        self._check_latent(latent_frame)
        video, convs = self.decoder(self._decoder_input(latent_frame, cache.latent_frames_decoded), cache.convs)
        assert convs is not None
        return self._finish(video), DecodeCache(convs, cache.latent_frames_decoded + latent_frame.shape[2])

    def decode_chunks(self, latent: Tensor) -> Iterator[Tensor]:
        """Stream (B, latent, L, h, w) as L pieces of video: 1 frame, then 4 frames each."""
        cache = self.init_decode_cache()
        for t in range(latent.shape[2]):
            video, cache = self.decode_chunk(latent[:, :, t : t + 1], cache)
            yield video

    def _finish(self, video: Tensor) -> Tensor:
        return video.clamp(-1.0, 1.0) if self.config.wan_layout else video

    def _denormalize(self, latent: Tensor, first_frame: int = 0) -> Tensor:
        latent_mean, latent_std = self.config.latent_statistics(latent, first_frame)
        return latent * latent_std + latent_mean

    def _decoder_input(self, latent: Tensor, first_frame: int = 0) -> Tensor:
        z = self._denormalize(latent, first_frame)
        return z.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else z

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"video must be (B, {self.config.in_channels}, F, H, W), got {tuple(video.shape)}")
        self.config.latents_for_frames(video.shape[2])
        H, W = video.shape[-2:]
        if H % SPATIAL_FACTOR or W % SPATIAL_FACTOR:
            raise ValueError(f"video height and width must be multiples of {SPATIAL_FACTOR}, got {H}x{W}")

    def _check_latent(self, latent: Tensor) -> None:
        C = self.config.latent_channels
        if latent.ndim != 5 or latent.shape[1] != C or latent.shape[2] < 1:
            raise ValueError(f"latent must be (B, {C}, L >= 1, h, w), got {tuple(latent.shape)}")
