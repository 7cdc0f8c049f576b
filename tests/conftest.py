"""Shared fixtures: CPU threads, offline text encoder, and one tiny pipeline per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm():
    from aptserve.engines.loading import load_text_encoder
    from aptserve.engines.text import TextEncoderConfig

    return load_text_encoder(TextEncoderConfig())


@pytest.fixture(scope="session")
def tiny_pipeline(minilm):
    from aptserve.engines.loading import load_model
    from aptserve.engines.pipeline import Pipeline
    from aptserve.engines.text import CachedTextEncoder

    return Pipeline(load_model("tiny"), CachedTextEncoder(minilm))


@pytest.fixture(scope="session")
def tiny_wan_pipe():
    """diffusers' WanPipeline (a test-only oracle) at a tiny random config: UMT5 with a T5 tokenizer built from an
    in-test vocabulary (no download), UniPC flow scheduler; weights moved off their init values."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers writes the Wan2.1 folder (a test-only oracle)")
    import transformers

    torch.manual_seed(0)
    words = ["a", "red", "circle", "moving", "left", "blue", "square", "cat", "dog", "on", "the", "grass"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    text_config = transformers.UMT5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=16, num_res_blocks=2,
        latents_mean=(torch.randn(16, generator=g) * 0.5).tolist(), latents_std=(torch.rand(16, generator=g) + 0.5).tolist(),
    )  # fmt: skip
    with torch.no_grad():
        for p in [*transformer.parameters(), *vae.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return diffusers.WanPipeline(
        tokenizer=transformers.T5Tokenizer(vocab=vocab, extra_ids=0),
        text_encoder=transformers.UMT5EncoderModel(text_config).eval(),
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        ),
    )


@pytest.fixture(scope="session")
def tiny_wan_folder(tiny_wan_pipe, tmp_path_factory):
    """`tiny_wan_pipe` as WanPipeline.save_pretrained writes it, the transformer in shards with an index."""
    pipe = tiny_wan_pipe
    folder = tmp_path_factory.mktemp("wan") / "wan2.1-t2v-tiny"
    pipe.save_pretrained(folder)
    pipe.transformer.save_pretrained(folder / "transformer", max_shard_size="100KB")  # sharded, with an index
    for stale in (folder / "transformer").glob("diffusion_pytorch_model.safetensors"):
        stale.unlink()
    return folder
