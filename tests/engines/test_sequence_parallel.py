"""Sequence parallel generators on real gloo process groups (2 and 4 CPU ranks) against the single-process model.

Each world size is one spawn: every rank builds the same seeded models, runs each case both ways and writes its max
abs differences to a file. The cases cover Ulysses alone, ring alone (3 heads on 2 ranks; 4 ranks with ulysses=1)
and both (6 heads on 4 ranks), token counts the degree does not divide (padding), and MMDiT text padding masks;
and the VAE decode split by height (whole and streamed), with and without the mid attention.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aptserve.engines.dit import DIT_PRESETS, DiTConfig, MMDiT
from aptserve.engines.parallel import (
    SequenceParallel,
    attention_with_lse,
    decoder_halo,
    make_plan,
    merge_partials,
    split_decode,
    split_decode_chunk,
)
from aptserve.engines.vae import VAE_PRESETS, CausalVAE, SpatialAttention, VAEConfig
from aptserve.engines.wan import WAN_PRESETS, WanConfig, WanTransformer
from aptserve.kernels import reference_attention

ATOL = 1e-4
MMDIT_SMALL = {h: DiTConfig(depth=2, hidden_size=12 * h, num_heads=h, text_dim=32) for h in (3, 6)}
WAN_SMALL = {
    h: WanConfig(depth=2, hidden_size=12 * h, num_heads=h, ffn_dim=64, text_dim=32, text_len=16, freq_dim=32)
    for h in (3, 6)
}
# name -> (generator class, config, latent (C, F, H, W), explicit ulysses degree or None), per world size
CASES = {
    2: {
        "mmdit-tiny-4h": (MMDiT, DIT_PRESETS["tiny"], (16, 3, 6, 6), None),  # 27 tokens: padded to 28
        "mmdit-3h-ring": (MMDiT, MMDIT_SMALL[3], (16, 2, 6, 4), None),
        "wan-tiny-4h": (WanTransformer, WAN_PRESETS["wan-tiny"], (16, 3, 6, 6), None),
        "wan-3h-ring": (WanTransformer, WAN_SMALL[3], (16, 2, 6, 4), None),
    },
    4: {
        "mmdit-tiny-4h": (MMDiT, DIT_PRESETS["tiny"], (16, 2, 6, 4), None),
        "mmdit-6h-ulysses2-ring2": (MMDiT, MMDIT_SMALL[6], (16, 3, 6, 6), None),  # 27 tokens: padded to 28
        "mmdit-6h-ring4": (MMDiT, MMDIT_SMALL[6], (16, 2, 6, 4), 1),
        "wan-tiny-4h": (WanTransformer, WAN_PRESETS["wan-tiny"], (16, 3, 6, 6), None),
        "wan-6h-ulysses2-ring2": (WanTransformer, WAN_SMALL[6], (16, 3, 6, 6), None),
    },
}


# 24 latent rows: each rank's window (its rows plus a halo of 10) is cut on at least one side, at 2 and 4 ranks.
VAE_CASES = {
    "vae-tiny": VAE_PRESETS["tiny"],
    "vae-mid-attention": VAEConfig(base_channels=8, mid_attention=True),
    "vae-wan2.1-layout": VAEConfig(layout="wan2.1", base_channels=8, mid_attention=True),
}
VAE_LATENT = (1, 16, 2, 24, 2)


def _inputs(config, latent: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Seeded inputs, batch 2, with text padding masks that differ between the two prompts."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *latent, generator=gen)
    text = torch.randn(2, 7, config.text_dim, generator=gen)
    text_mask = torch.tensor([[True] * 7, [True, True, False, True, True, False, False]])
    return x, torch.tensor([1.0, 0.7]), text, text_mask


def _run_cases(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    diffs = {}
    for name, (cls, config, latent, ulysses) in CASES[world_size].items():
        model = cls(config).eval()
        model.init_weights(torch.Generator().manual_seed(0), zero_out=False)
        parallel = SequenceParallel(model, ulysses=ulysses)
        inputs = _inputs(config, latent)
        with torch.no_grad():
            expected, got = model(*inputs), parallel(*inputs)
        diffs[name] = {
            "max_abs_diff": (got - expected).abs().max().item(),
            "scale": expected.abs().max().item(),
            "plan": [parallel.plan.ulysses, parallel.plan.ring],
        }
    for name, config in VAE_CASES.items():
        torch.manual_seed(0)  # CausalVAE draws its initial weights from the global generator
        vae = CausalVAE(config).eval()
        for module in vae.modules():  # attention starts as the identity: make it matter
            if isinstance(module, SpatialAttention):
                torch.nn.init.normal_(module.proj.weight, std=0.2, generator=torch.Generator().manual_seed(2))
        latent = torch.randn(VAE_LATENT, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = vae.decode(latent)
            whole = split_decode(vae, latent)
            cache, chunks = vae.init_decode_cache(), []
            for t in range(latent.shape[2]):
                chunk, cache = split_decode_chunk(vae, latent[:, :, t : t + 1], cache)
                chunks.append(chunk)
        streamed = torch.cat(chunks, dim=2)
        diffs[name] = {
            "max_abs_diff": max((whole - expected).abs().max().item(), (streamed - expected).abs().max().item()),
            "scale": expected.abs().max().item(),
            "unclamped_share": (expected.abs() < 1).float().mean().item(),
            "halo": decoder_halo(vae.decoder),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(diffs))
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_matches_single_process(tmp_path: Path, world_size: int) -> None:
    mp.start_processes(
        _run_cases, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, start_method="spawn"
    )
    heads = {name: case[1].num_heads for name, case in CASES[world_size].items()}
    for rank in range(world_size):
        diffs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert diffs.keys() == CASES[world_size].keys() | VAE_CASES.keys()
        for name in VAE_CASES:
            result = diffs.pop(name)
            assert result["unclamped_share"] > 0.5, (rank, name, result)
            assert result["scale"] > 0.1 and result["max_abs_diff"] < ATOL, (rank, name, result)
        for name, result in diffs.items():
            ulysses, ring = result["plan"]
            assert ulysses * ring == world_size and heads[name] % ulysses == 0, (name, result)
            assert result["scale"] > 0.1 and result["max_abs_diff"] < ATOL, (rank, name, result)
    plans = {tuple(result["plan"]) for result in diffs.values()}
    assert any(ring > 1 for _, ring in plans), "a case must exercise the ring"


def test_lse_attention_and_merge_equal_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (5, 9, 9))
    mask = torch.rand(2, 9, generator=gen) > 0.3
    mask[:, 4:] = False  # the second block is all padding: it must drop out of the merge, not poison it
    mask[:, 0] = True
    out_a, lse_a = attention_with_lse(q, k[:, :, :4], v[:, :, :4], mask[:, :4])
    out_b, lse_b = attention_with_lse(q, k[:, :, 4:], v[:, :, 4:], mask[:, 4:])
    assert torch.isneginf(lse_b).all() and (out_b == 0).all()
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    expected = reference_attention(q, k, v, mask)
    assert (out - expected).abs().max() < 1e-6
    scores = (q @ k.transpose(-1, -2) * 16**-0.5).masked_fill(~mask[:, None, None], -math.inf)
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-6)


def test_plan_rejects_a_ulysses_degree_that_does_not_divide_the_heads(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="ulysses degree 2 must divide"):
            make_plan(num_heads=3, ulysses=2)
        plan = make_plan(num_heads=3)
        assert (plan.degree, plan.ulysses, plan.ring) == (1, 1, 1)
    finally:
        dist.destroy_process_group()
