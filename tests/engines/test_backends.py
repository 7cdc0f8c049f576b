"""Backends: the chooser, compiled == eager on the tiny DiT and VAE (CPU, fp32), and the channels-last VAE decode."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aptserve.engines.backends import BACKENDS, modules_of, prepare
from aptserve.engines.config import MODEL_PRESETS, build_generator
from aptserve.engines.dit import DIT_PRESETS, MMDiT
from aptserve.engines.quant import FP8Linear, quantized_layer_names
from aptserve.engines.vae import VAE_PRESETS, CausalVAE, memory_format_of

CL = torch.channels_last_3d
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _tiny_dit() -> MMDiT:
    model = MMDiT(DIT_PRESETS["tiny"]).eval()
    model.init_weights(torch.Generator().manual_seed(0), zero_out=False)
    return model


def _dit_inputs(frames: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, frames, 8, 8, generator=g)
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, 20:] = False
    return x, torch.ones(1), torch.randn(1, 32, 384, generator=g), mask


def _tiny_vae() -> CausalVAE:
    torch.manual_seed(0)
    model = CausalVAE(VAE_PRESETS["tiny"]).eval()
    with torch.no_grad():  # zero-initialised parts (biases) get values so no path hides behind a zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _latent(latents: int = 3) -> torch.Tensor:
    return torch.randn(1, 16, latents, 8, 8, generator=torch.Generator().manual_seed(2))


def _decode_chunked(vae: CausalVAE, latent: torch.Tensor) -> torch.Tensor:
    return torch.cat(list(vae.decode_chunks(latent)), dim=2)


# ----------------------------------------------------------------------------------------------------------------------
# The chooser


def test_unknown_backend_and_options_raise() -> None:
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        prepare(nn.Linear(2, 2), "fast")
    with pytest.raises(ValueError, match="apply to the compiled and tensorrt backends"):
        prepare(_tiny_vae(), "eager", mode="max-autotune")
    with pytest.raises(ValueError, match="unknown attention impl"):
        prepare(_tiny_dit(), attention="flash9")
    with pytest.raises(ValueError, match="MMDiT, WanTransformer and CausalVAE"):
        prepare(nn.Linear(2, 2), "compiled")
    with pytest.raises(ValueError, match=r"\.dit/\.vae"):
        modules_of(object())
    assert BACKENDS == ("eager", "compiled", "tensorrt")


def test_tensorrt_backend_says_it_is_missing() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="tensorrt backend needs the tensorrt package; not available here"):
            prepare(_tiny_vae(), "tensorrt")
    else:
        with pytest.raises(ValueError, match="unverified"):
            prepare(_tiny_vae(), "tensorrt")


def test_eager_options_apply_to_a_pipeline_like_target() -> None:
    target = SimpleNamespace(dit=_tiny_dit(), vae=_tiny_vae(), text_encoder=object())
    assert modules_of(target) == [target.dit, target.vae]
    assert prepare(target, attention="reference", fp8=True, channels_last=True) is target
    assert target.dit.attention_impl == "reference"
    assert len(quantized_layer_names(target.dit)) == 45
    assert target.vae.channels_last and not any(isinstance(m, FP8Linear) for m in target.vae.modules())
    prepare(target, fp8=True)  # idempotent: nothing quantised twice
    assert len(quantized_layer_names(target.dit)) == 45


# ----------------------------------------------------------------------------------------------------------------------
# Compiled == eager


@torch.no_grad()
def test_compiled_dit_matches_eager() -> None:
    eager = _tiny_dit()
    compiled = prepare(copy.deepcopy(eager), "compiled")
    inputs = _dit_inputs()
    torch.testing.assert_close(compiled(*inputs), eager(*inputs), **FP32_TOL)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_dit_shape_buckets_each_get_a_graph() -> None:
    eager = _tiny_dit()
    compiled = prepare(copy.deepcopy(eager), "compiled")
    for frames in (5, 2, 5):  # dynamic=False: a new bucket compiles its own static graphs; a seen one reuses them
        inputs = _dit_inputs(frames)
        torch.testing.assert_close(compiled(*inputs), eager(*inputs), **FP32_TOL)


@torch.no_grad()
def test_compiled_vae_chunked_decode_traces_like_eager() -> None:
    # aot_eager: dynamo graphs with the conv cache dict in and out (first chunk, later chunks), no C++ build.
    eager = _tiny_vae()
    compiled = prepare(copy.deepcopy(eager), "compiled", compiler="aot_eager")
    latent = _latent()
    torch.testing.assert_close(_decode_chunked(compiled, latent), _decode_chunked(eager, latent), **FP32_TOL)


@pytest.mark.slow  # inductor's cold compile of the decoder graphs takes about a minute on 2 cores
@pytest.mark.parametrize("channels_last", [False, True])
@torch.no_grad()
def test_compiled_vae_decode_matches_eager(channels_last: bool) -> None:
    eager = _tiny_vae()
    compiled = prepare(copy.deepcopy(eager), "compiled", channels_last=channels_last)
    latent = _latent()
    torch.testing.assert_close(_decode_chunked(compiled, latent), _decode_chunked(eager, latent), **FP32_TOL)
    torch.testing.assert_close(compiled.decode(latent), eager.decode(latent), **FP32_TOL)


@torch.no_grad()
def test_compiled_fp8_dit_traces_like_eager_fp8() -> None:
    # aot_eager: the same dynamo/AOT graphs without inductor's C++ build, so FP8Linear's tracing is checked cheaply.
    eager = prepare(_tiny_dit(), fp8=True)
    compiled = prepare(copy.deepcopy(eager), "compiled", compiler="aot_eager")
    inputs = _dit_inputs()
    torch.testing.assert_close(compiled(*inputs), eager(*inputs), **FP32_TOL)


class Stop(Exception):
    pass


def _generator(arch: str) -> nn.Module:
    """The tiny MMDiT, or Wan's architecture at toy size; both take `_dit_inputs`."""
    if arch == "mmdit":
        return _tiny_dit()
    model = build_generator(MODEL_PRESETS["wan-tiny"]).eval()
    model.init_weights(torch.Generator().manual_seed(0), zero_out=False)
    return model


def _counting_hook(calls: list[int], stop_at: int | None = None):
    def between_blocks() -> None:
        calls.append(len(calls))
        if len(calls) == stop_at:
            raise Stop

    return between_blocks


@pytest.mark.parametrize("arch", ["mmdit", "wan2.1"])
@pytest.mark.parametrize("backend", ["eager", "compiled"])
@torch.no_grad()
def test_between_blocks_hook_runs_after_every_block_and_can_stop_the_pass(arch: str, backend: str) -> None:
    # the compiled backend compiles block by block, so the loop and its hook stay eager around the graphs
    options = {"compiler": "aot_eager"} if backend == "compiled" else {}
    model, inputs, calls = prepare(_generator(arch), backend, **options), _dit_inputs(), []
    plain = model(*inputs)
    model.between_blocks = _counting_hook(calls)
    torch.testing.assert_close(model(*inputs), plain, rtol=0, atol=0)
    assert calls == list(range(len(model.blocks)))
    calls.clear()
    model.between_blocks = _counting_hook(calls, stop_at=2)
    with pytest.raises(Stop):
        model(*inputs)
    assert len(calls) == 2


@pytest.mark.parametrize("arch", ["mmdit", "wan2.1"])
@torch.no_grad()
def test_a_whole_forward_graph_leaves_the_hook_out_without_a_break_or_a_recompile(arch: str) -> None:
    # cuda_graphs compiles the whole forward: the hook must neither break that graph nor become one of its guards
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model, inputs, calls = _generator(arch), _dit_inputs(), []
    compiled = torch.compile(model, backend=count_graphs, fullgraph=True, dynamic=False)
    expected = model(*inputs)
    for hook in (None, _counting_hook(calls), _counting_hook(calls, stop_at=1)):  # warm-up runs with no hook
        model.between_blocks = hook
        torch.testing.assert_close(compiled(*inputs), expected, **FP32_TOL)
    assert len(graphs) == 1 and calls == []


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graphs_dit_and_decoder_match_eager() -> None:
    dit = _tiny_dit().cuda()
    graphed = prepare(copy.deepcopy(dit), "compiled", cuda_graphs=True)
    inputs = [t.cuda() for t in _dit_inputs()]
    for _ in range(3):  # warm-up, record, replay
        torch.testing.assert_close(graphed(*inputs), dit(*inputs), **FP32_TOL)
    vae = _tiny_vae().cuda()
    graphed_vae = prepare(copy.deepcopy(vae), "compiled", cuda_graphs=True)
    latent = _latent(4).cuda()
    for _ in range(2):
        torch.testing.assert_close(_decode_chunked(graphed_vae, latent), _decode_chunked(vae, latent), **FP32_TOL)


# ----------------------------------------------------------------------------------------------------------------------
# Channels-last VAE decode


def _formats_seen(vae: CausalVAE, run) -> set:
    seen = set()

    def record(module, inputs, output):
        seen.add(memory_format_of(output[0] if isinstance(output, tuple) else output))

    hooks = [m.register_forward_hook(record) for name, m in vae.decoder.named_modules() if name]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def test_channels_last_decode_equals_default() -> None:
    default = _tiny_vae()
    channels_last = copy.deepcopy(default).to(memory_format=CL)
    assert channels_last.channels_last and not default.channels_last
    latent = _latent(4)
    whole = default.decode(latent)
    assert (channels_last.decode(latent) - whole).abs().max().item() < 1e-5
    chunks = list(channels_last.decode_chunks(latent))
    assert (torch.cat(chunks, dim=2) - _decode_chunked(default, latent)).abs().max().item() < 1e-5
    assert {memory_format_of(c) for c in chunks} == {CL}


@torch.no_grad()
def test_channels_last_activations_stay_channels_last() -> None:
    vae = _tiny_vae().to(memory_format=CL)
    latent = _latent(3)
    assert _formats_seen(vae, lambda: list(vae.decode_chunks(latent))) == {CL}
    assert _formats_seen(vae, lambda: vae.decode(latent)) == {CL}
    default = _tiny_vae()
    assert _formats_seen(default, lambda: default.decode(latent)) == {torch.contiguous_format}
