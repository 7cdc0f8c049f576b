"""TensorRT engines behind the eager and compiled backends' interface: the generator's forward(x, t, text, text_mask)
-> velocity and the VAE's decode_chunk(latent_frame, cache) -> (video, cache), each running the engine of the one
bucket the export fixed, with inputs and outputs bound by the manifest's names.

    attach(pipeline.dit, manifest, cache_dir)   # dit.forward now runs the "dit" engine
    attach(pipeline.vae, manifest, cache_dir)   # vae.decode_chunk runs the decoder engines; vae.decode stays eager

The decoder runs the "vae_decoder_first" engine for a clip's latent frame 0 (no cache yet; 1 video frame) and the
"vae_decoder_chunk" engine for each later one (4 frames). `bind` and `decoder_feeds` are checked here; the rest
(`EngineRunner` and all that uses it) needs TensorRT and is unverified: TensorRT cannot be installed here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from aptserve.engines.backends.tensorrt.build import cached_engine
from aptserve.engines.backends.tensorrt.manifest import GraphSpec, Manifest, TensorSpec
from aptserve.engines.dit import MMDiT
from aptserve.engines.onnx_export import CACHE_IN, CACHE_OUT
from aptserve.engines.vae import CausalVAE, DecodeCache
from aptserve.engines.wan import WanTransformer

DIT_GRAPH = "dit"  # the graph names `engines.onnx_export` writes into the manifest
DECODER_FIRST_GRAPH = "vae_decoder_first"
DECODER_GRAPH = "vae_decoder_chunk"


def bind(specs: Sequence[TensorSpec], values: Sequence[Tensor], graph: str) -> dict[str, Tensor]:
    """Each value under its spec's name, in order; ValueError when the count or a shape is not the engine's bucket."""
    if len(values) != len(specs):
        raise ValueError(f"the {graph} engine takes {[s.name for s in specs]}; got {len(values)} tensors")
    for spec, value in zip(specs, values):
        if tuple(value.shape) != spec.shape:
            raise ValueError(
                f"the {graph} engine is built for {spec.name} of shape {spec.shape} (its bucket); "
                f"got {tuple(value.shape)}"
            )
    return {spec.name: value for spec, value in zip(specs, values)}


def decoder_feeds(graph: GraphSpec, name: str, latent_frame: Tensor, cache: DecodeCache) -> dict[str, Tensor]:
    """A decoder graph's inputs by name: the latent frame, its index in the clip, and the cache entries it reads."""
    feeds = {}
    for spec in graph.inputs:
        if spec.name == "latent":
            feeds[spec.name] = latent_frame
        elif spec.name == "latent_index":
            feeds[spec.name] = torch.tensor([cache.latent_frames_decoded], device=latent_frame.device)
        elif spec.name.startswith(CACHE_IN) and spec.name.removeprefix(CACHE_IN) in cache.convs:
            feeds[spec.name] = cache.convs[spec.name.removeprefix(CACHE_IN)]
        else:
            raise ValueError(
                f"the {name} engine takes {spec.name!r}, which this decode cannot give: a clip starts with "
                f"{DECODER_FIRST_GRAPH}, and each later chunk needs the cache the previous one returned"
            )
    return bind(graph.inputs, [feeds[spec.name] for spec in graph.inputs], name)


class EngineRunner:
    """One deserialized engine and its execution context; runs on torch's current CUDA stream (unverified)."""

    def __init__(self, engine: bytes, device: torch.device):
        import tensorrt as trt

        self.device = device
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine)
        if self.engine is None:
            raise RuntimeError("TensorRT could not load the engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        kinds = trt.DataType
        torch_dtypes = {
            kinds.FLOAT: torch.float32, kinds.HALF: torch.float16, kinds.BF16: torch.bfloat16,
            kinds.INT32: torch.int32, kinds.INT64: torch.int64, kinds.INT8: torch.int8, kinds.UINT8: torch.uint8,
            kinds.BOOL: torch.bool, kinds.FP8: torch.float8_e4m3fn,
        }  # fmt: skip
        self.dtypes = {n: torch_dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def __call__(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise ValueError(f"engine inputs {missing} were not given")
        # Converted inputs stay referenced until the call returns; torch's allocator reuses their memory only in
        # stream order, after the engine has read them.
        inputs = {n: feeds[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine; its log above says why")
        return outputs


class TensorRTGenerator:
    """The generator's forward on the "dit" engine: (x, t, text, text_mask) -> velocity in x's dtype.

    A plain callable, not an nn.Module: set as a module's `forward` it must shadow the class's method, which a
    submodule (registered in `_modules`) would not."""

    def __init__(self, runner: EngineRunner, graph: GraphSpec):
        self.runner = runner
        self.graph = graph

    def __call__(
        self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, return_features: tuple[int, ...] = ()
    ) -> Tensor:
        if return_features:
            raise ValueError("a TensorRT engine returns the velocity only, not block features")
        outputs = self.runner(bind(self.graph.inputs, [x, t, text, text_mask], DIT_GRAPH))
        return outputs[self.graph.outputs[0].name].to(x.dtype)


class TensorRTDecoder:
    """`CausalVAE.decode_chunk` on the decoder engines: latent frame 0 on the first-chunk engine, later ones (one latent
    frame each, as the pipeline streams them) on the chunk engine."""

    def __init__(self, first: tuple[EngineRunner, GraphSpec], chunk: tuple[EngineRunner, GraphSpec]):
        self.first = first
        self.chunk = chunk

    def decode_chunk(self, latent_frame: Tensor, cache: DecodeCache) -> tuple[Tensor, DecodeCache]:
        starts = cache.latent_frames_decoded == 0
        (runner, graph), name = (self.first, DECODER_FIRST_GRAPH) if starts else (self.chunk, DECODER_GRAPH)
        outputs = runner(decoder_feeds(graph, name, latent_frame, cache))
        convs = {n.removeprefix(CACHE_OUT): t for n, t in outputs.items() if n.startswith(CACHE_OUT)}
        video = outputs[graph.outputs[0].name].to(latent_frame.dtype)
        return video, DecodeCache(convs, cache.latent_frames_decoded + latent_frame.shape[2])


def _runner(manifest: Manifest, graph: str, cache_dir: Path, device: torch.device) -> tuple[EngineRunner, GraphSpec]:
    engine = cached_engine(manifest, graph, cache_dir, device.index or 0)
    return EngineRunner(engine, device), manifest.graph(graph)


def attach(module: nn.Module, manifest: Manifest, cache_dir: Path) -> nn.Module:
    """Make `module` (a generator or a CausalVAE, on a CUDA device) run the export's engines, in place (unverified)."""
    device = next(module.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"TensorRT engines run on CUDA devices; the module is on {device}")
    if manifest.attention == "plugin":  # the PTX is in the engine; registering too costs nothing if TensorRT needs it
        from aptserve.kernels.trt_plugin import register_plugin

        register_plugin()
    if isinstance(module, (MMDiT, WanTransformer)):
        # an instance attribute shadows the class's forward, as the compiled backend's CUDA-graph step does
        module.forward = TensorRTGenerator(*_runner(manifest, DIT_GRAPH, cache_dir, device))
    elif isinstance(module, CausalVAE):
        first, chunk = (_runner(manifest, graph, cache_dir, device) for graph in (DECODER_FIRST_GRAPH, DECODER_GRAPH))
        module.decode_chunk = TensorRTDecoder(first, chunk).decode_chunk
    else:
        raise ValueError(
            f"the tensorrt backend runs MMDiT, WanTransformer and CausalVAE modules; got {type(module).__name__}"
        )
    return module
