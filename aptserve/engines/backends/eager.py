"""The eager backend: modules run as built, with the module-level speed options every backend starts from.

Those options change how a module computes, not what it is: the attention implementation of the generator, FP8
linears in the generator (`engines.quant`), and a channels-last (NDHWC) VAE decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aptserve import kernels
from aptserve.engines.dit import MMDiT
from aptserve.engines.quant import DIT_SKIP, quantize_model, quantized_layer_names
from aptserve.engines.vae import CausalVAE
from aptserve.engines.wan import WanTransformer


def apply_options(
    module: nn.Module,
    attention: str | None = None,
    fp8: bool = False,
    channels_last: bool = False,
    fp8_keep_blocks: Sequence[int] = (),
) -> nn.Module:
    """Set the generator's attention impl and FP8 linears (all but the embeddings, modulation, final layer and the
    blocks in `fp8_keep_blocks`), or the VAE's memory format, in place; other modules are unchanged."""
    if isinstance(module, (MMDiT, WanTransformer)):
        if attention is not None:
            if attention not in kernels.ATTENTION_IMPLS:
                raise ValueError(f"unknown attention impl {attention!r}; choose one of {kernels.ATTENTION_IMPLS}")
            module.attention_impl = attention
        if fp8 and not quantized_layer_names(module):
            skip = getattr(module, "fp8_skip", DIT_SKIP)  # WanTransformer names its own
            quantize_model(module, skip=(*skip, *(f"blocks.{i}" for i in fp8_keep_blocks)))
    elif isinstance(module, CausalVAE) and channels_last:
        module.to(memory_format=torch.channels_last_3d)
    return module


def prepare_eager(module: nn.Module, **options) -> nn.Module:
    """Eager execution: the options above and nothing else."""
    return apply_options(module, **options)
