"""ONNX export at a static shape bucket, the input of the TensorRT backend: the generator (MMDiT or Wan) and the VAE
decoder as two streaming graphs whose causal-conv cache is explicit inputs and outputs, plus a manifest.json.

FP8 linears (`engines.quant.FP8Linear`) become standard QuantizeLinear/DequantizeLinear with FLOAT8E4M3FN zero points
and the torch emulation's scales: weights per output channel (stored as e4m3 initializers), activations per token from
the row's amax, computed in the graph. Attention is standard ops (torch's SDPA decomposition: MatMul, Softmax) or one
`aptserve::triton_attention` plugin node per call, for TensorRT's ahead-of-time plugin. The module imports with torch
alone; writing a graph needs the `onnx` package (torch's exporter uses it, and the checker runs on every file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.onnx import symbolic_helper

from aptserve.engines import vae as vae_module
from aptserve.engines.config import ModelConfig, parse_size
from aptserve.engines.quant import DIT_SKIP, FP8Linear, quantize_model, quantized_layer_names
from aptserve.engines.vae import CausalVAE, VAEConfig, normalisation_tensors
from aptserve.kernels.fp8 import _MIN_AMAX, E4M3_MAX, FP8_DTYPE

OPSET = 19  # QuantizeLinear/DequantizeLinear take float8 from 19 on; NVIDIA's diffusion exports use 19-20
ATTENTION_FORMS = ("sdpa", "plugin")
PLUGIN_NAMESPACE = "aptserve"
PLUGIN_NAME = "triton_attention"  # the node's op type; TensorRT finds the plugin as "aptserve::triton_attention"
PLUGIN_INPUTS = ("q", "k", "v", "key_padding_mask")
# float32 is what onnxruntime checks here. A bfloat16 graph is for TensorRT only: ONNX's Conv (Wan's patch embedding,
# every VAE conv) takes bfloat16 from opset 22, past the TorchScript exporter's 20, so its type check is skipped.
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

DIT_FILE = "dit.onnx"
DECODER_FIRST_FILE = "vae_decoder_first.onnx"
DECODER_CHUNK_FILE = "vae_decoder_chunk.onnx"
MANIFEST_FILE = "manifest.json"
DIT_INPUTS = ("x", "t", "text", "text_mask")
DIT_OUTPUT = "velocity"
CACHE_IN, CACHE_OUT = "cache_in.", "cache_out."  # + the streaming layer's module path in the decoder

_SDPA = "aten::scaled_dot_product_attention"


# ----------------------------------------------------------------------------------------------------------------------
# Shape bucket


@dataclass(frozen=True)
class Bucket:
    """One static shape: width x height pixels, frames (4L - 3), batch."""

    width: int
    height: int
    frames: int
    batch: int = 1

    def latent_shape(self, vae: VAEConfig) -> tuple[int, int, int, int, int]:
        """(B, C, L, h, w) of the generator's input and output."""
        f = vae.spatial_factor
        return (self.batch, vae.latent_channels, vae.latents_for_frames(self.frames), self.height // f, self.width // f)

    def to_dict(self) -> dict[str, int]:
        return {"width": self.width, "height": self.height, "frames": self.frames, "batch": self.batch}


def parse_bucket(text: str, batch: int = 1) -> Bucket:
    """'WxHxF' (1280x720x49) -> Bucket; sizes are multiples of 16 and F = 4L - 3."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"bucket must look like '1280x720x49' (width x height x frames); got {text!r}")
    width, height = parse_size((int(parts[0]), int(parts[1])))
    frames = int(parts[2])
    if frames < 1 or (frames - 1) % vae_module.TEMPORAL_FACTOR or batch < 1:
        raise ValueError(f"bucket frames must be 4*L - 3 (1, 5, ..., 49) and batch >= 1; got {frames} and {batch}")
    return Bucket(width, height, frames, batch)


def generator_inputs(
    config: ModelConfig, bucket: Bucket, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Tensor]:
    """Example generator inputs at `bucket`, as the pipeline feeds them for one step: noise x, t = 1, text tokens
    (random here) and a mask with padding at the end. A dict keyed by `DIT_INPUTS`."""
    gen = torch.Generator().manual_seed(seed)
    length = config.text.max_length
    mask = torch.arange(length)[None].expand(bucket.batch, -1) < max(1, length // 2)  # (B, L): half padding
    return {
        "x": torch.randn(bucket.latent_shape(config.vae), generator=gen).to(dtype),  # (B, C, L, h, w)
        "t": torch.ones(bucket.batch, dtype=dtype),
        "text": torch.randn(bucket.batch, length, config.text.dim, generator=gen).to(dtype),  # (B, L, Dt)
        "text_mask": mask.contiguous(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# FP8 linears as standard Q/DQ


def _fp8_zero_point(g, rows: int):
    """FLOAT8E4M3FN zeros, one per row: the zero point that types QuantizeLinear's output as e4m3 (shaped like the
    per-axis scale, as ONNX requires; `rows` comes from the trace, since ONNX shape inference may not know it)."""
    return g.op("Constant", value_t=torch.zeros(rows, dtype=FP8_DTYPE))


class _QuantizeDequantizeRows(torch.autograd.Function):
    """x (M, K) through e4m3 with one scale per row (M,): QuantizeLinear -> DequantizeLinear on axis 0."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, rows: int) -> Tensor:
        return (x / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).float() * scale[:, None]

    @staticmethod
    def symbolic(g, x, scale, rows: int):
        zero = _fp8_zero_point(g, rows)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero, axis_i=0), scale, zero, axis_i=0)


class _DequantizeRows(torch.autograd.Function):
    """An e4m3 weight (N, K) times its per-output-channel scales (N,): DequantizeLinear on axis 0."""

    @staticmethod
    def forward(ctx, weight: Tensor, scale: Tensor, rows: int) -> Tensor:
        return weight.float() * scale[:, None]

    @staticmethod
    def symbolic(g, weight, scale, rows: int):
        return g.op("DequantizeLinear", weight, scale, _fp8_zero_point(g, rows), axis_i=0)


class QDQLinear(nn.Module):
    """An `FP8Linear` in the form ONNX writes: its e4m3 weight and scales, the activation scale computed per token as
    the emulation does (row amax / 448), x and W dequantised to fp32 and multiplied there."""

    def __init__(self, layer: FP8Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight_fp8", layer.weight_e4m3)  # (N, K) e4m3: an FLOAT8E4M3FN initializer
        self.register_buffer("weight_scale", layer.weight_scale)  # (N,) fp32
        self.register_buffer("bias", layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        scale = x2.abs().amax(dim=-1).clamp(min=_MIN_AMAX) * (1.0 / E4M3_MAX)  # (M,) as quantize_fp8_rows
        x_dq = _QuantizeDequantizeRows.apply(x2, scale, int(x2.shape[0]))  # (M, K); M is static in a bucket
        w_dq = _DequantizeRows.apply(self.weight_fp8, self.weight_scale, self.out_features)  # (N, K)
        out = x_dq @ w_dq.t()  # (M, N)
        out = out if self.bias is None else out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., N)


# ----------------------------------------------------------------------------------------------------------------------
# Attention as the TensorRT plugin node


@symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
def _plugin_attention(g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA -> one `aptserve::triton_attention(q, k, v, key_padding_mask)` node, (B, H, Nq, D) out; the kernel uses
    the default softmax scale D**-0.5. Unmasked attention gets an all-true mask, so the plugin has one signature."""
    if dropout_p or is_causal or enable_gqa or not symbolic_helper._is_none(scale):
        raise ValueError("the attention plugin takes plain SDPA only: no dropout, causal mask, GQA or custom scale")
    if symbolic_helper._is_none(attn_mask):
        batch, _, keys, _ = symbolic_helper._get_tensor_sizes(key)
        mask = g.op("Constant", value_t=torch.ones(batch, keys, dtype=torch.bool))
    else:  # sdpa_attention's (B, 1, 1, Nk) view of the (B, Nk) key padding mask
        mask = g.op("Squeeze", attn_mask, g.op("Constant", value_t=torch.tensor([1, 2])))
    out = g.op(
        f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}", query, key, value, mask, plugin_namespace_s=PLUGIN_NAMESPACE, aot_i=1
    )
    out.setType(query.type())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def _export_form(generator: nn.Module, attention: str) -> Iterator[None]:
    """The generator as ONNX should see it, restored afterwards: SDPA attention (or the plugin symbolic in its place)
    and each FP8Linear as a QDQLinear."""
    impl = generator.attention_impl
    fp8 = [(name, module) for name, module in generator.named_modules() if isinstance(module, FP8Linear)]
    for name, module in fp8:
        generator.set_submodule(name, QDQLinear(module))
    generator.attention_impl = "sdpa"
    if attention == "plugin":
        torch.onnx.register_custom_op_symbolic(_SDPA, _plugin_attention, OPSET)
    try:
        yield
    finally:
        if attention == "plugin":
            torch.onnx.unregister_custom_op_symbolic(_SDPA, OPSET)
        generator.attention_impl = impl
        for name, module in fp8:
            generator.set_submodule(name, module)


@contextlib.contextmanager
def _plain_convs() -> Iterator[None]:
    """Trace every VAE conv as one Conv node: `vae._conv3d` reroutes short CPU clips through a time-last conv, a
    CPU-speed choice that would put transposes around large convs in a graph meant for TensorRT."""
    limit = vae_module._CPU_SLOW_CONV3D_MAX
    vae_module._CPU_SLOW_CONV3D_MAX = -1
    try:
        yield
    finally:
        vae_module._CPU_SLOW_CONV3D_MAX = limit


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    custom_opsets: dict[str, int] | None = None,
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape checks become constants: static
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided slices stay ops
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            custom_opsets=custom_opsets,
        )


def _io(names: Sequence[str], tensors: Sequence[Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for n, t in zip(names, tensors)
    ]


def export_generator(
    generator: nn.Module, inputs: dict[str, Tensor], path: str | Path, attention: str = "sdpa"
) -> dict[str, Any]:
    """Write the generator at the static shapes of `inputs` (`generator_inputs`) to `path`; returns its graph entry
    for the manifest (file, inputs and outputs with shapes and dtypes). FP8Linear layers become Q/DQ."""
    _check_attention(attention)
    path = Path(path)
    args = tuple(inputs[name] for name in DIT_INPUTS)
    with _export_form(generator, attention):
        opsets = {PLUGIN_NAMESPACE: 1} if attention == "plugin" else None
        _export(generator, args, path, DIT_INPUTS, [DIT_OUTPUT], opsets)
    # The velocity has x's shape and dtype (x0 = z - v).
    return {"file": path.name, "inputs": _io(DIT_INPUTS, args), "outputs": _io([DIT_OUTPUT], args[:1])}


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {attention!r}; choose one of {ATTENTION_FORMS}")


class DecoderFirstChunk(nn.Module):
    """Latent frame 0 -> its one video frame and the cache every streaming layer leaves. It has its own graph: frame 0
    is decoded alone (the temporal upsamplers pass it through rather than doubling it), so no zero history makes
    the later-chunk graph produce it."""

    def __init__(self, vae: CausalVAE, cache_keys: Sequence[str]):
        super().__init__()
        self.vae, self.cache_keys = vae, tuple(cache_keys)

    def forward(self, latent: Tensor) -> tuple[Tensor, ...]:  # (B, C, 1, h, w)
        video, cache = self.vae.decode_chunk(latent, self.vae.init_decode_cache())
        return (video, *(cache.convs[key] for key in self.cache_keys))  # (B, 3, 1, H, W), caches


class DecoderChunk(nn.Module):
    """Latent frame `latent_index` >= 1 and the cache -> its 4 video frames and the next cache. The index picks the
    frame's latent statistics (a VAE may normalise its first frames apart); past the last such row all are equal."""

    def __init__(self, vae: CausalVAE, cache_keys: Sequence[str]):
        super().__init__()
        self.vae, self.cache_keys = vae, tuple(cache_keys)
        config = vae.config
        like = torch.zeros(1, config.latent_channels, 1, 1, 1, dtype=vae.decoder.stem.weight.dtype)
        rows = range(len(config.first_frames_std) + 1)
        means, stds = zip(*(normalisation_tensors(config.normalisation, like, f) for f in rows))

        def stacked(values) -> Tensor:  # (rows, 1, C, 1, 1, 1) from scalars or (1, C, 1, 1, 1) tensors
            return torch.stack([torch.as_tensor(v, dtype=like.dtype).expand_as(like) for v in values])

        # decode_chunk's (mean, std) for latent frame f; the last row serves every later frame
        self.register_buffer("mean", stacked(means))
        self.register_buffer("std", stacked(stds))

    def forward(self, latent: Tensor, latent_index: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        row = latent_index.clamp(max=self.mean.shape[0] - 1)[0]  # latent_index (1,) int64
        z = latent * self.std[row] + self.mean[row]  # as CausalVAE._denormalize
        video, convs = self.vae.decoder(z, dict(zip(self.cache_keys, cache)))
        video = video.clamp(-1.0, 1.0) if self.vae.config.wan_layout else video  # as CausalVAE._finish
        return (video, *(convs[key] for key in self.cache_keys))  # (B, 3, 4, H, W), caches


def export_decoder(vae: CausalVAE, latent_frame: Tensor, folder: str | Path) -> dict[str, dict[str, Any]]:
    """Write the first-chunk and later-chunk decoder graphs for latent frames like `latent_frame` (B, C, 1, h, w) into
    `folder`; returns their manifest entries. The cache inputs and outputs are the streaming layers in the order the
    decoder runs them, named by module path, shaped as decoding frame 0 leaves them."""
    folder = Path(folder)
    with torch.no_grad(), _plain_convs():
        cache = vae.decode_chunk(latent_frame, vae.init_decode_cache())[1].convs
    keys, past = list(cache), tuple(cache.values())
    cache_in, cache_out = [CACHE_IN + key for key in keys], [CACHE_OUT + key for key in keys]
    chunk_args = (latent_frame, torch.ones(1, dtype=torch.int64), *past)
    batch, _, _, h, w = latent_frame.shape
    f = vae.config.spatial_factor
    first, later = (  # the videos' shapes and dtype, for the manifest
        torch.empty(batch, vae.config.in_channels, frames, f * h, f * w, dtype=latent_frame.dtype, device="meta")
        for frames in (1, vae.config.temporal_factor)
    )
    with _plain_convs():
        _export(
            DecoderFirstChunk(vae, keys),
            (latent_frame,),
            folder / DECODER_FIRST_FILE,
            ["latent"],
            ["video", *cache_out],
        )
        chunk_inputs = ["latent", "latent_index", *cache_in]
        _export(DecoderChunk(vae, keys), chunk_args, folder / DECODER_CHUNK_FILE, chunk_inputs, ["video", *cache_out])
    return {
        "vae_decoder_first": {
            "file": DECODER_FIRST_FILE,
            "inputs": _io(["latent"], [latent_frame]),
            "outputs": _io(["video", *cache_out], [first, *past]),
        },
        "vae_decoder_chunk": {
            "file": DECODER_CHUNK_FILE,
            "inputs": _io(chunk_inputs, chunk_args),
            "outputs": _io(["video", *cache_out], [later, *past]),
        },
    }


def weights_hash(*modules: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of `modules`: the weights' identity."""
    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            digest.update(f"{i}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_graph(path: str | Path, check_types: bool = True) -> None:
    """onnx's checker on a written graph, with type and shape inference unless `check_types` is off (by path: files
    over 2 GB keep their weights as external data)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=check_types)


def export_model(
    spec: str,
    bucket: str | Bucket,
    out_dir: str | Path,
    fp8: bool = False,
    fp8_keep_blocks: Sequence[int] = (),
    attention: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load model `spec` (a checkpoint folder, a name under models/, or a preset) and write dit.onnx, the two decoder
    graphs and manifest.json into `out_dir` at `bucket` ('WxHxF' or a Bucket). `fp8` quantises the generator's
    linears as the server does (the model's skip list, plus the blocks in `fp8_keep_blocks`). Returns the manifest.
    `progress`, if given, is called with each graph's name before it is written."""
    from aptserve.engines.loading import load_model

    try:  # torch's exporter needs it too, and fails with less to go on
        import onnx  # noqa: F401
    except ImportError:
        raise ValueError(
            "ONNX export needs the onnx package: pip install 'aptserve[export]' (or 'onnx>=1.17')"
        ) from None
    bucket = parse_bucket(bucket) if isinstance(bucket, str) else bucket
    _check_attention(attention)
    if fp8_keep_blocks and not fp8:
        raise ValueError("fp8_keep_blocks names blocks kept out of FP8, so it needs fp8")
    if dtype not in EXPORT_DTYPES.values():
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}; got {dtype}")
    loaded = load_model(spec, dtype=dtype)
    config, depth = loaded.config, loaded.config.dit.depth
    if any(not 0 <= b < depth for b in fp8_keep_blocks):
        raise ValueError(f"fp8_keep_blocks {list(fp8_keep_blocks)} name blocks the generator lacks (it has {depth})")
    weights = weights_hash(loaded.dit, loaded.vae)
    if fp8:  # as backends.eager.apply_options quantises for serving (not imported: the TensorRT backend imports us)
        skip = getattr(loaded.dit, "fp8_skip", DIT_SKIP)
        quantize_model(loaded.dit, skip=(*skip, *(f"blocks.{i}" for i in fp8_keep_blocks)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = generator_inputs(config, bucket, dtype)
    step = progress or (lambda name: None)
    step("dit")
    graphs = {"dit": export_generator(loaded.dit, inputs, out / DIT_FILE, attention)}
    step("vae_decoder")
    graphs |= export_decoder(loaded.vae, inputs["x"][:, :, :1], out)
    for graph in graphs.values():
        check_graph(out / graph["file"], check_types=dtype != torch.bfloat16)
    manifest = {
        "format": "aptserve-onnx/1",
        "model": {
            "name": config.name,
            "arch": config.arch,
            "source": loaded.source,
            "weights_sha256": weights,
            "config": config.to_dict(),
        },
        "bucket": bucket.to_dict(),
        "opset": OPSET,
        "dtype": str(dtype).removeprefix("torch."),
        "fp8": _fp8_entry(quantized_layer_names(loaded.dit), fp8_keep_blocks) if fp8 else None,
        "attention": _attention_entry(attention),
        "graphs": graphs,
        "decode": {
            "latent_frames": inputs["x"].shape[2],
            "frames_per_chunk": {"first": 1, "chunk": vae_module.TEMPORAL_FACTOR},
            "cache": [entry["name"].removeprefix(CACHE_IN) for entry in graphs["vae_decoder_chunk"]["inputs"][2:]],
        },
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _fp8_entry(layers: list[str], keep_blocks: Sequence[int]) -> dict[str, Any]:
    return {
        "weights": "e4m3, one scale per output channel (FLOAT8E4M3FN initializer -> DequantizeLinear axis 0)",
        "activations": "e4m3, one scale per token computed in the graph: row amax / 448 (QuantizeLinear axis 0)",
        "layers": layers,
        "kept_blocks": list(keep_blocks),
    }


def _attention_entry(attention: str) -> dict[str, Any]:
    if attention == "sdpa":
        return {"form": "sdpa"}
    return {
        "form": "plugin",
        "op": f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}",
        "plugin_namespace": PLUGIN_NAMESPACE,
        "aot": True,
        "inputs": list(PLUGIN_INPUTS),
        "softmax_scale": "head_dim ** -0.5",
    }
