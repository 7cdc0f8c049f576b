"""Attention and other ops for aptserve, each with a plain-torch reference. No model knowledge lives here."""

from aptserve.kernels.attention import ATTENTION_IMPLS, attention, choose_attention_impl, reference_attention

__all__ = ["ATTENTION_IMPLS", "attention", "choose_attention_impl", "reference_attention"]
