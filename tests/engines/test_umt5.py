"""The umt5 text encoder (Wan2.1's text path) against diffusers' WanPipeline._get_t5_prompt_embeds (a test-only oracle)
at a tiny random UMT5EncoderModel, whose T5 tokenizer is built from an in-test Unigram vocabulary (no sentencepiece,
no download). Also: the Wan generator sees the same input from both representations, and the cache is lossless.
"""

import pytest
import torch

from aptserve.engines.loading import load_text_encoder
from aptserve.engines.text import CachedTextEncoder, TextEncoderConfig, clean_prompt
from aptserve.engines.wan import WAN_PRESETS, WanTransformer

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle for Wan's text path")
transformers = pytest.importorskip("transformers")

TINY = WAN_PRESETS["wan-tiny"]  # text_dim 32, text_len 16
WORDS = ["a", "red", "circle", "moving", "left", "blue", "square", "cat", "dog", "on", "the", "grass"]
PROMPTS = ["  a red   circle &amp;amp; the\tdog on grass ", "cat"]  # cleaning matters for the first


@pytest.fixture(scope="module")
def umt5_path(tmp_path_factory):
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz&;"]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    config = transformers.UMT5Config(
        vocab_size=len(vocab),
        d_model=TINY.text_dim,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    path = tmp_path_factory.mktemp("umt5")
    transformers.UMT5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def umt5(umt5_path):
    return load_text_encoder(
        TextEncoderConfig(kind="umt5", path=umt5_path, dim=TINY.text_dim, max_length=TINY.text_len)
    )


@pytest.fixture(scope="module")
def wan_embeds(umt5_path):
    """What WanPipeline feeds its transformer: (B, text_len, Dt), real tokens then zeros."""
    pipe = diffusers.WanPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(umt5_path),
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(umt5_path),
        vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=TINY.text_len, device=torch.device("cpu"))


def test_matches_wan_pipeline_prompt_embeds(umt5, wan_embeds):
    tokens, mask = umt5.encode(PROMPTS)
    assert tokens.shape == (2, TINY.text_len, TINY.text_dim) and tokens.dtype == torch.float32
    lengths = mask.sum(1).tolist()
    assert lengths[0] > lengths[1] > 1 and lengths[0] < TINY.text_len
    assert torch.equal(mask, wan_embeds.abs().sum(-1) > 0)
    assert torch.equal(tokens, wan_embeds)


def test_wan_generator_input_is_identical(umt5, wan_embeds):
    model = WanTransformer(TINY).eval()
    model.init_weights(torch.Generator().manual_seed(0), zero_out=False)
    tokens, mask = umt5.encode(PROMPTS)
    garbage = tokens.masked_fill(~mask[..., None], 100.0)  # any encoder's padding rows: the generator zeroes them
    every = torch.ones_like(mask)
    for text in (tokens, garbage):
        assert torch.equal(model.pad_text(text, mask), model.pad_text(wan_embeds, every))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, TINY.in_channels, 2, 4, 4, generator=g), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected = model(x, t, wan_embeds, every)
        assert torch.equal(model(x, t, tokens, mask), expected)
        assert torch.equal(model(x, t, garbage, mask), expected)


def test_cache_stores_real_tokens_and_returns_the_encoder_output(umt5):
    direct, mask = umt5.encode(PROMPTS)
    cached = CachedTextEncoder(umt5)
    for prompts, rows in ((PROMPTS, [0, 1]), (PROMPTS[::-1], [1, 0]), (PROMPTS, [0, 1])):
        tokens, got_mask = cached.encode(prompts)
        assert torch.equal(tokens, direct[rows]) and torch.equal(got_mask, mask[rows])
    assert cached.misses == 2 and cached.hits == 4
    assert [cached._cache[p][0].shape[0] for p in PROMPTS] == mask.sum(1).tolist()


class NonzeroPadding:
    """An encoder whose padding rows are not zero (like minilm and t5): the cache must keep them."""

    dim, max_length = 4, 6

    def encode(self, prompts):
        tokens = [
            torch.randn(self.max_length, self.dim, generator=torch.Generator().manual_seed(len(p))) for p in prompts
        ]
        mask = torch.arange(self.max_length)[None] < torch.tensor([len(p) for p in prompts])[:, None]
        return torch.stack(tokens), mask  # (B, L, D), (B, L)


def test_cache_keeps_nonzero_padding():
    encoder, cached = NonzeroPadding(), CachedTextEncoder(NonzeroPadding())
    expected, expected_mask = encoder.encode(["abc", "a"])
    for _ in range(2):  # a miss, then a hit
        tokens, mask = cached.encode(["abc", "a"])
        assert torch.equal(tokens, expected) and torch.equal(mask, expected_mask)
    assert cached._cache["abc"][0].shape == (6, 4)


def test_clean_prompt_matches_wan_pipeline():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for prompt in (*PROMPTS, "\n  &lt;b&gt; two\u00a0 words\u3000", "", "plain"):
        assert clean_prompt(prompt) == prompt_clean(prompt)
    assert clean_prompt(PROMPTS[0]) == "a red circle & the dog on grass"


def test_umt5_needs_a_path():
    with pytest.raises(ValueError, match="umt5 text encoder needs `path`"):
        TextEncoderConfig(kind="umt5", dim=4096, max_length=512)
