"""Engine build from the exported ONNX through TensorRT's Python API, and the cached lookup the runtime uses.

Unverified: TensorRT cannot be installed where this project is built and tested; of this file only `profile_shapes` is
checked here. What the build does:
- a strongly typed network (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`: needed for FP8 Q/DQ on TensorRT 10.x,
  always on and the flag ignored on 11.x): every tensor keeps the type the graph gives it, so FP8 runs exactly where
  the export wrote FLOAT8E4M3FN QuantizeLinear/DequantizeLinear pairs, and there are no precision flags to set (11.x
  removed them);
- one optimisation profile per bucket: an export is one bucket, so an input the parser left dynamic gets
  min = opt = max = its bucket shape (a fully static export needs no profile);
- the `aptserve::triton_attention` plugin registered before parsing when the export used it (manifest attention
  "plugin"); its kernel is then compiled for sm_90 during the build (`aptserve.kernels.trt_plugin`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from aptserve.engines.backends.tensorrt.cache import engine_key, load_engine, save_engine
from aptserve.engines.backends.tensorrt.manifest import GraphSpec, Manifest

FP8_MIN_CAPABILITY = (8, 9)
PLUGIN_DTYPES = ("float16", "bfloat16")  # the Triton kernel's q/k/v types


def profile_shapes(network_inputs: Mapping[str, Sequence[int]], graph: GraphSpec) -> dict[str, tuple[int, ...]]:
    """The bucket shape of each network input with a dynamic (-1) dimension, from the manifest; ValueError where the
    parsed network and the manifest disagree (an input the manifest lacks, or a different static dimension)."""
    specs = {spec.name: spec.shape for spec in graph.inputs}
    shapes = {}
    for name, dims in network_inputs.items():
        if name not in specs:
            raise ValueError(f"{graph.file}: network input {name!r} is not among the manifest's {sorted(specs)}")
        bucket = specs[name]
        if len(dims) != len(bucket) or any(d not in (-1, b) for d, b in zip(dims, bucket)):
            raise ValueError(f"{graph.file}: input {name} is {tuple(dims)} in the graph but {bucket} in the manifest")
        if -1 in dims:
            shapes[name] = bucket
    return shapes


def build_engine(manifest: Manifest, graph: str, workspace_bytes: int | None = None) -> bytes:
    """The serialized engine of `graph` from the export in `manifest.folder` (TensorRT >= 10.9; unverified)."""
    spec = manifest.graph(graph)
    if manifest.attention == "plugin" and manifest.dtype not in PLUGIN_DTYPES:
        raise ValueError(
            f"{manifest.folder} puts the attention plugin in a {manifest.dtype} graph; the plugin runs "
            f"{PLUGIN_DTYPES}: export with --dtype bfloat16"
        )
    import tensorrt as trt

    if manifest.attention == "plugin":
        from aptserve.kernels.trt_plugin import register_plugin

        register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    path = manifest.folder / spec.file
    if not parser.parse_from_file(str(path)):  # from the path, so weights stored beside the graph are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shapes = profile_shapes({tensor.name: tuple(tensor.shape) for tensor in inputs}, spec)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, shape in shapes.items():
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {path}; its log above says why")
    return bytes(serialized)


def cached_engine(manifest: Manifest, graph: str, cache_dir: Path, device: int = 0) -> bytes:
    """The engine of `graph` for GPU `device`: from the cache, or built and stored on a miss (unverified)."""
    import tensorrt as trt
    import torch

    capability = torch.cuda.get_device_capability(device)
    if manifest.fp8 and capability < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"{manifest.folder} is an FP8 export: it needs compute capability >= 8.9; GPU has {capability}"
        )
    key = engine_key(manifest, graph, torch.cuda.get_device_name(device), trt.__version__)
    engine = load_engine(cache_dir, key)
    if engine is None:
        with torch.cuda.device(device):  # the builder targets the current CUDA device
            engine = build_engine(manifest, graph)
        save_engine(cache_dir, key, engine)
    return engine
