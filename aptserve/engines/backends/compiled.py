"""The compiled backend: torch.compile of the generator's blocks and of the VAE decoder's chunk step.

Graphs are compiled with `dynamic=False`, so every new input shape (a server shape bucket: size x frames, and for the
decoder also first chunk / later chunk / whole clip) gets its own specialised graph the first time it is seen.

- Generator: each `MMDiTBlock` is compiled on its own ("regional compilation"). All blocks share one code object, so
  the 36 blocks of apt-8b reuse two graphs (ordinary block, last block) per shape: cold start is two block compiles,
  not one 36-block graph, and inductor fuses the same norm/modulation/RoPE/gating pointwise work either way. The loop
  over the blocks stays eager, so the generator's `between_blocks` hook (the in-forward cancellation check) runs.
- VAE: the whole `Decoder.forward` is compiled; the conv cache dict is an input and an output of the graph, so the
  streaming state stays explicit. Inductor fuses RMS norm, SiLU and residual adds around the convs (the fused path).
- `cuda_graphs=True` (CUDA only) uses mode "reduce-overhead": one CUDA graph per shape. The generator is then
  compiled whole, since per-block graphs would share one graph across blocks with different weight addresses. A
  replay overwrites the previous replay's outputs, so each call starts a new cudagraph step and clones its outputs
  (the decode cache among them) before returning. That whole-forward graph leaves `between_blocks` out (it is
  neither traced nor guarded on), so cancellation waits for the end of the pass. Unverified on a GPU so far; off by
  default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from aptserve.engines.backends.eager import apply_options
from aptserve.engines.dit import MMDiT
from aptserve.engines.vae import CausalVAE
from aptserve.engines.wan import WanTransformer

# Each shape bucket adds graphs to the same code objects (two per bucket for the blocks, three for the decoder);
# dynamo's default of 8 per code object would silently fall back to eager after a handful of buckets.
MIN_RECOMPILE_LIMIT = 64


def prepare_compiled(
    module: nn.Module,
    mode: str | None = None,
    compiler: str = "inductor",
    cuda_graphs: bool = False,
    **options,
) -> nn.Module:
    """Apply the eager options, then compile `module` (an MMDiT or a CausalVAE) in place; see the module docstring.

    `compiler` is torch.compile's backend: "inductor" for speed; "aot_eager" traces the same graphs without code
    generation (quick checks on machines where inductor's C++ build is slow).
    """
    apply_options(module, **options)
    _raise_recompile_limit()
    if cuda_graphs:
        mode = "reduce-overhead"
    compile_kwargs = {"mode": mode, "backend": compiler, "dynamic": False}
    if isinstance(module, (MMDiT, WanTransformer)):
        _compile_dit(module, cuda_graphs, compile_kwargs)
    elif isinstance(module, CausalVAE):
        _compile_forward(module.decoder, cuda_graphs, compile_kwargs)
    else:
        raise ValueError(
            f"the compiled backend handles MMDiT, WanTransformer and CausalVAE modules; got {type(module).__name__}"
        )
    return module


def _compile_dit(dit: MMDiT | WanTransformer, cuda_graphs: bool, compile_kwargs: dict) -> None:
    if cuda_graphs:
        _compile_forward(dit, cuda_graphs, compile_kwargs)
        return
    for block in dit.blocks:
        block.compile(**compile_kwargs)


def _compile_forward(module: nn.Module, cuda_graphs: bool, compile_kwargs: dict) -> None:
    if not cuda_graphs:
        module.compile(**compile_kwargs)
        return
    # An instance attribute `forward` shadows the class's: the wrapper stays eager around the compiled graph.
    module.forward = _graph_step(torch.compile(module.forward, **compile_kwargs))


def _graph_step(compiled: Callable) -> Callable:
    @functools.wraps(compiled)
    def step(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args, **kwargs)
        return pytree.tree_map_only(torch.Tensor, torch.clone, out)

    return step


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), MIN_RECOMPILE_LIMIT))
