import pytest
import torch

from aptserve.engines.text import CachedTextEncoder, TextEncoderConfig


def test_minilm_token_states_and_mask(minilm):
    tokens, mask = minilm.encode(["a red circle moving left", ""])
    assert tokens.shape == (2, 32, 384) and tokens.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[0].sum() == 7 and mask[1].sum() == 2  # [CLS] words [SEP]
    assert not torch.allclose(tokens[0, 1], tokens[1, 1])


class CountingEncoder:
    def __init__(self, inner):
        self.inner, self.dim, self.max_length, self.calls = inner, inner.dim, inner.max_length, []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


def test_cache_serves_repeats_and_evicts_least_recently_used(minilm):
    counting = CountingEncoder(minilm)
    cached = CachedTextEncoder(counting, capacity=2)
    first, _ = cached.encode(["a", "b", "a"])
    assert counting.calls == [["a", "b"]]
    again, _ = cached.encode(["b", "a"])
    torch.testing.assert_close(again, first[[1, 0]])
    assert counting.calls == [["a", "b"]] and cached.hits == 3
    cached.encode(["c"])  # evicts "b": "a" was used more recently
    cached.encode(["a"])
    cached.encode(["b"])
    assert counting.calls[-1] == ["b"] and len(cached) == 2
    direct, _ = minilm.encode(["b"])
    torch.testing.assert_close(cached.encode(["b"])[0], direct)


def test_bad_text_configs():
    with pytest.raises(ValueError, match="unknown text encoder"):
        TextEncoderConfig(kind="clip")
    with pytest.raises(ValueError, match="needs `path`"):
        TextEncoderConfig(kind="t5", dim=512)
