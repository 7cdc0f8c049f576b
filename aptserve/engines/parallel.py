"""Sequence parallelism: one clip's video tokens split across the ranks of a torch.distributed process group.

Attention over the split sequence is Ulysses (all-to-all from sequence-sharded to head-sharded, attend, all-to-all
back) over the part of the degree that divides the head count, and a ring over key/value blocks, merged by
log-sum-exp, for the rest (Wan 1.3B's 12 heads on 8 ranks: Ulysses 4 x ring 2). `SequenceParallel` wraps an MMDiT or
a WanTransformer with the generator's call signature and output; modulation, projections and MLPs are per token and
run on each rank's shard with no communication. `split_decode` / `split_decode_chunk` split the VAE decode by height,
each rank decoding its rows plus the context its convs need. Inference only: the collectives carry no gradients.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aptserve import kernels
from aptserve.engines.dit import (
    MOD_ROWS,
    Attention,
    MMDiT,
    check_inputs,
    modulate,
    rope_3d,
    timestep_embedding,
)
from aptserve.engines.vae import SPATIAL_FACTOR, CausalVAE, ConvCache, DecodeCache, Decoder, SpatialAttention, Upsample
from aptserve.engines.wan import MOD_ROWS as WAN_MOD_ROWS
from aptserve.engines.wan import WanTransformer, wan_rope

# ---------------------------------------------------------------------------------------------------------------
# Attention over a sequence split across ranks
# ---------------------------------------------------------------------------------------------------------------


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.reference_attention`'s fp32 math that also returns the log-sum-exp of each query's scores.

    Returns out (B, H, Nq, D) and lse (B, H, Nq), both fp32; a query whose keys are all masked gets out 0 and lse
    -inf, so it drops out of a merge. The Triton kernels do not return lse yet, so ring blocks use this."""
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    lse = scores.logsumexp(-1)  # (B, H, Nq)
    finite = lse.masked_fill(lse.isinf(), 0.0)
    return (scores - finite[..., None]).exp() @ v.float(), lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two key sets from the results over each: (out, lse) as above."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = lse.masked_fill(lse.isinf(), 0.0)
    out = out_a * (lse_a - finite).exp()[..., None] + out_b * (lse_b - finite).exp()[..., None]
    return out, lse


@dataclass(frozen=True)
class SequenceParallelPlan:
    """How a group of `degree` ranks splits attention: rank r holds sequence shard r; ranks u + U*j for u < U form
    Ulysses group j (U = `ulysses` consecutive shards, heads split U ways) and ranks with the same u form a ring of
    `ring` = degree / U over those Ulysses chunks."""

    group: dist.ProcessGroup
    rank: int  # in `group`
    degree: int
    ulysses: int
    ring: int
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ring_ranks: tuple[int, ...]  # global ranks of this rank's ring, in ring order


def make_plan(
    num_heads: int, group: dist.ProcessGroup | None = None, ulysses: int | None = None
) -> SequenceParallelPlan:
    """The plan for `group` (default: the world). Ulysses takes gcd(degree, num_heads) unless `ulysses` says
    otherwise; it must divide both. Every process of the default group must call this (it creates subgroups)."""
    group = group or dist.group.WORLD
    ranks = dist.get_process_group_ranks(group)
    degree = len(ranks)
    ulysses = math.gcd(degree, num_heads) if ulysses is None else ulysses
    if ulysses < 1 or degree % ulysses or num_heads % ulysses:
        raise ValueError(f"ulysses degree {ulysses} must divide both the group size {degree} and {num_heads} heads")
    ring = degree // ulysses
    rank = dist.get_rank(group)
    mine_u, mine_j = rank % ulysses, rank // ulysses
    ulysses_group = ring_group = None
    for j in range(ring):  # every process creates every subgroup, in the same order
        created = dist.new_group([ranks[j * ulysses + u] for u in range(ulysses)]) if ulysses > 1 else None
        ulysses_group = created if j == mine_j else ulysses_group
    for u in range(ulysses):
        created = dist.new_group([ranks[j * ulysses + u] for j in range(ring)]) if ring > 1 else None
        ring_group = created if u == mine_u else ring_group
    ring_ranks = tuple(ranks[j * ulysses + mine_u] for j in range(ring))
    return SequenceParallelPlan(group, rank, degree, ulysses, ring, ulysses_group, ring_group, ring_ranks)


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _seq_to_heads(x: torch.Tensor, plan: SequenceParallelPlan) -> torch.Tensor:
    """(S, B, H, n, D) sequence-sharded -> (S, B, H/U, U*n, D) head-sharded, in one all-to-all."""
    x = x.unflatten(2, (plan.ulysses, -1)).movedim(2, 0).contiguous()  # (U, S, B, H/U, n, D): row i goes to rank i
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=plan.ulysses_group)  # row i now came from rank i: sequence chunk i
    return out.movedim(0, 3).flatten(3, 4)


def _heads_to_seq(x: torch.Tensor, plan: SequenceParallelPlan) -> torch.Tensor:
    """(B, H/U, U*n, D) head-sharded -> (B, H, n, D) sequence-sharded, in one all-to-all."""
    x = x.unflatten(2, (plan.ulysses, -1)).movedim(2, 0).contiguous()  # (U, B, H/U, n, D): chunk i goes to rank i
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=plan.ulysses_group)  # row i now holds head group i
    return out.movedim(0, 1).flatten(1, 2)


def _ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, plan: SequenceParallelPlan
) -> torch.Tensor:
    """Local queries against every ring member's keys: K/V (and their mask) travel one hop per step, overlapped
    with the attention on the block in hand; partial results merge by log-sum-exp. Returns fp32 (B, H, Nq, D)."""
    position = plan.ring_ranks.index(dist.get_rank())
    send_to, recv_from = plan.ring_ranks[(position + 1) % plan.ring], plan.ring_ranks[position - 1]
    block, block_mask = torch.stack([k, v]).contiguous(), mask.to(torch.uint8)  # gloo has no bool
    out = lse = None
    for step in range(plan.ring):
        if step < plan.ring - 1:
            next_block, next_mask = torch.empty_like(block), torch.empty_like(block_mask)
            requests = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, block, send_to, plan.ring_group),
                    dist.P2POp(dist.isend, block_mask, send_to, plan.ring_group),
                    dist.P2POp(dist.irecv, next_block, recv_from, plan.ring_group),
                    dist.P2POp(dist.irecv, next_mask, recv_from, plan.ring_group),
                ]
            )
        part = attention_with_lse(q, block[0], block[1], block_mask.bool())
        out, lse = part if out is None else merge_partials(out, lse, *part)
        if step < plan.ring - 1:
            for request in requests:
                request.wait()
            block, block_mask = next_block, next_mask
    return out


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    plan: SequenceParallelPlan,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention of this rank's queries over the keys of every rank: q, k, v (B, H, n, D) are this rank's shard of
    one sequence (the same lengths on every rank), `key_padding_mask` (B, n) True where a key is real. Returns
    (B, H, nq, D).

    Without a ring the attention runs through `kernels.attention(impl=...)`; ring blocks use the fp32 lse math."""
    if plan.ulysses > 1:
        q = _seq_to_heads(q[None], plan)[0]  # (B, H/U, U*nq, D): queries may be fewer than keys
        k, v = _seq_to_heads(torch.stack([k, v]), plan).unbind(0)  # (B, H/U, U*n, D)
        key_padding_mask = _all_gather(key_padding_mask.to(torch.uint8), plan.ulysses_group, dim=1).bool()
    if plan.ring > 1:
        out = _ring_attention(q, k, v, key_padding_mask, plan).to(q.dtype)
    else:
        out = kernels.attention(q, k, v, key_padding_mask, impl=impl)
    return _heads_to_seq(out, plan) if plan.ulysses > 1 else out


# ---------------------------------------------------------------------------------------------------------------
# Generators with their video tokens split across ranks
# ---------------------------------------------------------------------------------------------------------------


def _shard(x: torch.Tensor, plan: SequenceParallelPlan, dim: int) -> torch.Tensor:
    """This rank's slice of `dim`, zero-padded at the end so every rank holds ceil(N / degree) entries."""
    size = -(-x.shape[dim] // plan.degree)
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, size * plan.degree - x.shape[dim]]
    return F.pad(x, pad).narrow(dim, plan.rank * size, size)


class SequenceParallel(nn.Module):
    """An MMDiT or WanTransformer run by every rank of a process group on 1/degree of the video tokens each.

    Same call and same output as the generator's `forward` (on every rank), without `return_features`. Video tokens
    are padded to a multiple of the degree; padding keys are masked and padding outputs dropped. MMDiT text tokens
    are replicated: every rank runs the text stream, but only rank 0's text keys are unmasked, so each key counts
    once. The generator's blocks, weights, `attention_impl` and `between_blocks` are used as they are."""

    def __init__(
        self, generator: MMDiT | WanTransformer, group: dist.ProcessGroup | None = None, ulysses: int | None = None
    ):
        super().__init__()
        if not isinstance(generator, (MMDiT, WanTransformer)):
            raise TypeError(f"sequence parallel runs an MMDiT or a WanTransformer; got {type(generator).__name__}")
        self.generator = generator
        self.plan = make_plan(generator.config.num_heads, group, ulysses)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Velocity (B, C, F, H, W), the whole clip on every rank."""
        if isinstance(self.generator, MMDiT):
            return self._mmdit_forward(x, t, text, text_mask)
        return self._wan_forward(x, t, text, text_mask)

    def _video_mask(self, num_tokens: int, batch: int, device: torch.device) -> torch.Tensor:
        """(B, n) True on this rank's real video tokens, False on the padding."""
        return _shard(torch.ones(batch, num_tokens, dtype=torch.bool, device=device), self.plan, dim=1)

    def _gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return _all_gather(tokens, self.plan.group, dim=1)[:, :num_tokens]  # (B, N, ...)

    def _attention(self, impl: str) -> Attention:
        """kernels.attention's stand-in for the generator's blocks: the same impl, across the plan's ranks."""

        def attention(q, k, v, key_padding_mask):
            return sequence_parallel_attention(q, k, v, key_padding_mask, self.plan, impl)

        return attention

    def _after_block(self) -> None:
        if self.generator.between_blocks is not None:
            self.generator.between_blocks()

    def _mmdit_forward(self, x, t, text, text_mask) -> torch.Tensor:
        g, plan = self.generator, self.plan
        grid = check_inputs(x, text, g.config)
        patches = g.patchify(x)  # (B, Nv, patch_dim)
        video = g.video_embed(_shard(patches, plan, dim=1))  # (B, n, D)
        text_tokens = g.text_embed(g.text_norm(text))  # (B, L, D)
        cond = g.condition(t, text, text_mask)  # (B, D)
        mod = g.shared_mod(cond).unflatten(-1, (2 * MOD_ROWS, -1))  # (B, 12, D)
        rope = _shard(rope_3d(grid, g.config.head_dim, g.config.rope_theta, x.device), plan, dim=0)  # (n, Dh/2)
        text_keys = text_mask.bool() & (plan.rank == 0)  # each text key counted once across the ranks
        key_padding_mask = torch.cat([text_keys, self._video_mask(patches.shape[1], x.shape[0], x.device)], dim=1)
        attention = self._attention(g.attention_impl)
        for block in g.blocks:  # the blocks themselves, with the joint attention spanning every rank's video
            video, text_tokens = block(video, text_tokens, mod, rope, key_padding_mask, attention)
            self._after_block()
        shift, scale = g.final_mod(cond).chunk(2, dim=-1)
        tokens = g.final_proj(modulate(g.final_norm(video), shift, scale))  # (B, n, patch_dim)
        return g.unpatchify(self._gather(tokens, patches.shape[1]), grid)

    def _wan_forward(self, x, t, text, text_mask) -> torch.Tensor:
        g, plan = self.generator, self.plan
        grid = check_inputs(x, text, g.config)
        video = g.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, N, D)
        num_tokens = video.shape[1]
        video = _shard(video, plan, dim=1).contiguous()  # (B, n, D)
        text_tokens = g.text_embed(g.pad_text(text, text_mask))  # (B, text_len, D)
        t_freq = timestep_embedding(t, g.config.freq_dim).to(g.time_embed[0].weight.dtype)
        temb = g.time_embed(t_freq).to(text_tokens.dtype)  # (B, D)
        mod = g.time_mod(temb).unflatten(-1, (WAN_MOD_ROWS, -1))  # (B, 6, D)
        rope = _shard(wan_rope(grid, g.config.head_dim, g.config.rope_theta, x.device), plan, dim=1)  # (2, n, Dh/2)
        mask = self._video_mask(num_tokens, x.shape[0], x.device)
        distributed = self._attention(g.attention_impl)

        def self_attention(q, k, v, _):  # every rank's video tokens, this rank's padding masked
            return distributed(q, k, v, mask)

        for block in g.blocks:  # cross-attention to the replicated text stays local
            video = block(video, text_tokens, mod, rope, g.attention_impl, self_attention=self_attention)
            self._after_block()
        shift, scale = (g.final_table.float() + temb.float()[:, None]).unbind(1)  # (B, D) each
        video = (g.final_norm(video) * (1 + scale[:, None]) + shift[:, None]).to(video.dtype)
        return g.unpatchify(self._gather(g.final_proj(video), num_tokens), grid)


# ---------------------------------------------------------------------------------------------------------------
# VAE decode with the height split across ranks
# ---------------------------------------------------------------------------------------------------------------

Piece = tuple[nn.Module, Callable[[torch.Tensor, ConvCache | None], tuple[torch.Tensor, ConvCache | None]]]


def _spatial_radius(module: nn.Module, scale: int) -> tuple[float, int]:
    """Latent rows of context `module` adds to an output row when its input has `scale` rows per latent row (its
    spatial conv radii, each at its own scale), and the scale of its output."""
    radius = 0.0
    for child in module.modules():  # registration order is call order
        if isinstance(child, Upsample):
            scale *= 2  # its own conv runs after the 2x interpolation
        elif isinstance(child, nn.Conv3d):
            radius += (child.kernel_size[1] // 2) / scale
    return radius, scale


def _plan_pieces(pieces: list[Piece], scale: int) -> tuple[list[float], list[int]]:
    """Per piece, the latent rows of context it and the pieces after it need; the input scale of each piece and
    the output scale of the last."""
    radii, scales = [], [scale]
    for module, _ in pieces:
        radius, scale = _spatial_radius(module, scale)
        radii.append(radius)
        scales.append(scale)
    return [sum(radii[i:]) for i in range(len(radii))], scales


def _decoder_pieces(decoder: Decoder) -> tuple[list[Piece], list[Piece]]:
    """The decoder's forward as pieces, split where the mid attention (global over a frame) needs every row; all
    in the first list for a decoder without it."""

    def head(x: torch.Tensor, convs: ConvCache | None) -> tuple[torch.Tensor, ConvCache | None]:
        return decoder.head(F.silu(decoder.head_norm(x)), convs)

    before = [(m, m) for m in (decoder.post_quant_conv, decoder.stem, decoder.mid.block1) if m is not None]
    after = [(decoder.mid.block2, decoder.mid.block2), *((s, s) for s in decoder.stages), (decoder.head, head)]
    return (before, after) if decoder.mid.attn is not None else (before + after, [])


def decoder_halo(decoder: Decoder) -> int:
    """Latent rows each side of a rank's own rows that its latent window needs for those rows to decode exactly."""
    return math.ceil(_plan_pieces(_decoder_pieces(decoder)[0], 1)[0][0])


def _run_cropped(
    pieces: list[Piece], x: torch.Tensor, lo: int, rows: tuple[int, int, int], convs: ConvCache | None
) -> tuple[torch.Tensor, int, ConvCache | None]:
    """Run `pieces` on x (latent rows from `lo`, one row each), before each piece cropping the window to the rows
    still needed: this rank's rows (start, end) of `height` plus the context of the pieces left, so the expensive
    high resolutions carry a thin halo. A layer's window is the same for every chunk, so a rank's cache stays
    consistent. Returns x, its first row and the cache, rows at the last piece's output scale."""
    start, end, height = rows
    needs, scales = _plan_pieces(pieces, 1)
    first = lo  # the window's first row, at the current scale
    for (_, run), need, scale, out_scale in zip(pieces, needs, scales, scales[1:]):
        margin = math.ceil(need * scale)
        keep_lo, keep_hi = max(0, start * scale - margin), min(height * scale, end * scale + margin)
        x, first = x[..., keep_lo - first : keep_hi - first, :], keep_lo
        x, convs = run(x, convs)
        first = first * out_scale // scale  # nearest 2x upsampling maps row i to rows 2i and 2i + 1
    return x, first, convs


def _gather_rows(core: torch.Tensor, bounds: list[int], factor: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's rows (rank r: latent rows bounds[r]:bounds[r+1], `factor` rows each) joined along H."""
    most = max(b - a for a, b in itertools.pairwise(bounds)) * factor
    padded = F.pad(core, (0, 0, 0, most - core.shape[-2])).contiguous()
    parts = [torch.empty_like(padded) for _ in bounds[1:]]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[..., : (b - a) * factor, :] for part, (a, b) in zip(parts, itertools.pairwise(bounds))], -2)


def _window_attention(attn: SpatialAttention, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """`attn(x)[..., lo:hi, :]` with only those rows as queries: x (B, C, T, H, W) is the whole frame."""
    B, C, T, H, W = x.shape
    tokens = attn.norm(x).permute(0, 2, 3, 4, 1).reshape(B * T, 1, H * W, C)  # (B*T, 1, H*W, C)
    _, k, v = attn.qkv(tokens).chunk(3, dim=-1)
    q = attn.qkv(tokens[:, :, lo * W : hi * W]).chunk(3, dim=-1)[0]
    out = attn.proj(F.scaled_dot_product_attention(q, k, v))  # (B*T, 1, rows*W, C)
    return x[..., lo:hi, :] + out.view(B, T, hi - lo, W, C).permute(0, 4, 1, 2, 3)


def _decode_rows(
    vae: CausalVAE, latent: torch.Tensor, first_frame: int, convs: ConvCache | None, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, ConvCache | None]:
    """The decoder on this rank's latent rows plus the context they need, which makes the rank's own rows exact; the
    mid attention, global over a frame, sees the whole frame gathered from every rank's exact rows. Returns the
    whole decoded chunk, gathered, and this rank's cache (of its windows)."""
    vae._check_latent(latent)
    group = group or dist.group.WORLD
    degree, rank, height = dist.get_world_size(group), dist.get_rank(group), latent.shape[-2]
    if height < degree:
        raise ValueError(f"{height} latent rows cannot be split across {degree} ranks")
    bounds = [height * r // degree for r in range(degree + 1)]
    rows = (bounds[rank], bounds[rank + 1], height)
    before, after = _decoder_pieces(vae.decoder)
    halo = decoder_halo(vae.decoder)
    lo = max(0, rows[0] - halo)
    z = vae._decoder_input(latent[..., lo : rows[1] + halo, :], first_frame)
    x, first, convs = _run_cropped(before, z, lo, rows, convs)
    if after:
        frame = _gather_rows(x[..., rows[0] - first : rows[1] - first, :], bounds, 1, group)  # (B, C0, L, h, w)
        margin = math.ceil(_plan_pieces(after, 1)[0][0])
        lo = max(0, rows[0] - margin)
        x = _window_attention(vae.decoder.mid.attn, frame, lo, min(height, rows[1] + margin))
        x, first, convs = _run_cropped(after, x, lo, rows, convs)
    core = x[..., SPATIAL_FACTOR * rows[0] - first : SPATIAL_FACTOR * rows[1] - first, :]  # (B, 3, T, 8 rows, W)
    return vae._finish(_gather_rows(core, bounds, SPATIAL_FACTOR, group)), convs


def split_decode(vae: CausalVAE, latent: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`vae.decode(latent)` with the height split across the ranks of `group`; the whole video on every rank."""
    return _decode_rows(vae, latent, 0, None, group)[0]


def split_decode_chunk(
    vae: CausalVAE, latent_frame: torch.Tensor, cache: DecodeCache, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, DecodeCache]:
    """`vae.decode_chunk` with the height split across ranks; each rank's cache holds its own windows' history."""
    video, convs = _decode_rows(vae, latent_frame, cache.latent_frames_decoded, dict(cache.convs), group)
    assert convs is not None
    return video, DecodeCache(convs, cache.latent_frames_decoded + latent_frame.shape[2])
