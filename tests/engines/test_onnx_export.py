"""ONNX export checked in onnxruntime on the CPU: the tiny generators (MMDiT and Wan) and the streamed VAE decode against
torch in fp32, the FP8 Q/DQ graph against the torch FP8 emulation, the plugin form's nodes, and the CLI's files.

FP8 bound. The graph computes what `FP8Linear._emulated` computes: the same e4m3 weights and scales, the same per-token
activation scale and rounding, only with the scales applied before the fp32 matmul instead of after it. Run op by op
(onnxruntime's basic level: constant folding, no fusions) it measured 6e-7 against outputs of size ~1 on an AMD EPYC
host; on an Intel Xeon host onnxruntime's fp32 MatMul sums in another order than torch's, one activation flips (below)
and the tiny MMDiT differs by 7.9e-3 op by op (Wan tiny: 1.6e-7). Any fused runtime reassociates fp32 math
(onnxruntime's extended level fuses RMSNorm, SiLU and MatMul scaling; TensorRT fuses more), and an FP8 model amplifies such 1e-7 changes: an activation on an e4m3 rounding
boundary flips to its neighbour, one step of 6-12%, and later layers carry it. On the tiny MMDiT a 1e-7 relative nudge
of the text input moves the torch emulation itself by 8.3e-3, and the fused onnxruntime graph differs by the same
8.3e-3 (Wan tiny: 2e-7); the FP8 error against fp32 is 1.9e-2. Op by op and fused, the bound is 2.5e-2: flips, not a
wrong graph; `test_generator_matches_torch_in_fp32` holds the same graph code to 1e-4 without FP8.
"""

import copy
import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from aptserve.cli import main
from aptserve.engines import onnx_export as ox
from aptserve.engines.config import MODEL_PRESETS
from aptserve.engines.loading import random_model
from aptserve.engines.quant import DIT_SKIP, quantize_model, quantized_layer_names
from aptserve.engines.vae import VAE_PRESETS, CausalVAE

FP32_BOUND = 1e-4  # max abs difference, onnxruntime vs torch, fp32 (measured below 1e-6 for the generators)
FP8_BOUND = 2.5e-2  # max abs difference, onnxruntime Q/DQ (op by op or fused) vs torch FP8 emulation: e4m3 flips
FP8_MIN_EFFECT = 1e-3  # the FP8 graph must differ from fp32 by more than this: it carries e4m3 rounding
BUCKET = ox.Bucket(width=32, height=32, frames=9)  # latent 3 x 4 x 4: 12 video tokens, 3 decode chunks
ARCHS = ("tiny", "wan-tiny")


def _session(path, fused: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path, feeds: dict[str, torch.Tensor], fused: bool = True) -> list[np.ndarray]:
    return _session(path, fused).run(None, {name: value.numpy() for name, value in feeds.items()})


def _max_diff(got: np.ndarray, want: torch.Tensor) -> float:
    return float(np.abs(got - want.numpy()).max())


@pytest.fixture(scope="module")
def generators() -> dict[str, nn.Module]:
    return {name: random_model(MODEL_PRESETS[name]).dit for name in ARCHS}


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, torch.Tensor]]:
    return {name: ox.generator_inputs(MODEL_PRESETS[name], BUCKET, seed=1) for name in ARCHS}


@pytest.mark.parametrize("name", ARCHS)
def test_generator_matches_torch_in_fp32(name, generators, inputs, tmp_path) -> None:
    generator, feeds = generators[name], inputs[name]
    entry = ox.export_generator(generator, feeds, tmp_path / "dit.onnx")
    (velocity,) = _run(tmp_path / "dit.onnx", feeds)
    with torch.no_grad():
        want = generator(**feeds)
    assert _max_diff(velocity, want) < FP32_BOUND
    assert [i["name"] for i in entry["inputs"]] == list(ox.DIT_INPUTS)
    assert entry["outputs"] == [{"name": "velocity", "shape": list(want.shape), "dtype": "float32"}]
    ops = {node.op_type for node in onnx.load(tmp_path / "dit.onnx").graph.node}
    assert {"MatMul", "Softmax"} <= ops and "QuantizeLinear" not in ops


@pytest.mark.parametrize("name", ARCHS)
def test_fp8_graph_matches_torch_emulation(name, generators, inputs, tmp_path) -> None:
    generator, feeds = generators[name], inputs[name]
    fp8 = copy.deepcopy(generator)
    skip = (*getattr(fp8, "fp8_skip", DIT_SKIP), "blocks.0")  # the model's skip list plus a bf16_blocks-style block
    layers = quantize_model(fp8, skip=skip)
    ox.export_generator(fp8, feeds, tmp_path / "dit.onnx")
    (velocity,) = _run(tmp_path / "dit.onnx", feeds, fused=False)
    (fused,) = _run(tmp_path / "dit.onnx", feeds)
    with torch.no_grad():
        want, full = fp8(**feeds), generator(**feeds)
    assert _max_diff(velocity, want) < FP8_BOUND
    assert _max_diff(fused, want) < FP8_BOUND
    assert _max_diff(velocity, full) > FP8_MIN_EFFECT
    assert len(quantized_layer_names(fp8)) == layers, "the export swaps the FP8 layers back"

    graph = onnx.load(tmp_path / "dit.onnx").graph
    quantize = [node for node in graph.node if node.op_type == "QuantizeLinear"]
    assert len(quantize) == layers  # one activation Q per FP8 linear; weights are stored e4m3
    fp8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8_weights) == layers
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    zero_point = constants[quantize[0].input[2]].attribute[0].t
    assert zero_point.data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert all(a.i == 0 for node in quantize for a in node.attribute if a.name == "axis"), "per-token scales"


@pytest.mark.parametrize("name", ARCHS)
def test_plugin_form_has_the_plugin_node(name, generators, inputs, tmp_path) -> None:
    generator, feeds = generators[name], inputs[name]
    ox.export_generator(generator, feeds, tmp_path / "dit.onnx", attention="plugin")
    ox.check_graph(tmp_path / "dit.onnx")  # types and shapes too: the custom domain is declared
    model = onnx.load(tmp_path / "dit.onnx")
    nodes = [node for node in model.graph.node if node.op_type == ox.PLUGIN_NAME]
    depth = MODEL_PRESETS[name].dit.depth
    assert len(nodes) == (2 * depth if name == "wan-tiny" else depth)  # Wan: self- and cross-attention per block
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "aptserve" and attrs == {"plugin_namespace": b"aptserve", "aot": 1}
        assert len(node.input) == len(ox.PLUGIN_INPUTS)
    assert "Softmax" not in {node.op_type for node in model.graph.node}


def test_plugin_export_leaves_the_generator_and_sdpa_export_as_they_were(generators, inputs, tmp_path) -> None:
    generator, feeds = generators["wan-tiny"], inputs["wan-tiny"]
    ox.export_generator(generator, feeds, tmp_path / "plugin.onnx", attention="plugin")
    assert generator.attention_impl == "auto"
    ox.export_generator(generator, feeds, tmp_path / "sdpa.onnx")  # the plugin symbolic is unregistered again
    ops = {node.op_type for node in onnx.load(tmp_path / "sdpa.onnx").graph.node}
    assert "Softmax" in ops and ox.PLUGIN_NAME not in ops


def _streamed(folder, latent: torch.Tensor) -> np.ndarray:
    """Decode chunk by chunk in onnxruntime, feeding each chunk's cache outputs back as the next one's inputs."""
    first, chunk = _session(folder / ox.DECODER_FIRST_FILE), _session(folder / ox.DECODER_CHUNK_FILE)
    video, *cache = first.run(None, {"latent": latent[:, :, :1].numpy()})
    pieces = [video]
    cache_names = [i.name for i in chunk.get_inputs()][2:]
    for t in range(1, latent.shape[2]):
        feeds = {"latent": latent[:, :, t : t + 1].numpy(), "latent_index": np.array([t], dtype=np.int64)}
        video, *cache = chunk.run(None, feeds | dict(zip(cache_names, cache)))
        pieces.append(video)
    return np.concatenate(pieces, axis=2)


@pytest.mark.parametrize("layout", ["aptserve", "wan2.1"])
def test_streamed_onnx_decode_equals_torch(layout, tmp_path) -> None:
    # Two first frames normalised apart: chunk 1 uses its own statistics, chunk 2 the shared ones.
    gen = torch.Generator().manual_seed(3)
    head = tuple(tuple(float(v) for v in torch.rand(16, generator=gen)) for _ in range(2))
    config = dataclasses.replace(
        VAE_PRESETS["tiny"], layout=layout, latent_mean=0.1, latent_std=0.5, first_frames_mean=head,
        first_frames_std=tuple(h[::-1] for h in head),
    )  # fmt: skip
    torch.manual_seed(0)
    vae = CausalVAE(config).eval()
    bucket = ox.Bucket(width=64, height=64, frames=9)  # wide enough that vae._conv3d would take its time-last path
    latent = torch.randn(bucket.latent_shape(config), generator=gen)
    entries = ox.export_decoder(vae, latent[:, :, :1], tmp_path)
    got = _streamed(tmp_path, latent)
    with torch.no_grad():
        want = vae.decode(latent)  # the whole clip in one pass
    assert got.shape == (1, 3, 9, 64, 64) and _max_diff(got, want) < FP32_BOUND
    first, chunk = entries["vae_decoder_first"], entries["vae_decoder_chunk"]
    assert [o["shape"][2] for o in (first["outputs"][0], chunk["outputs"][0])] == [1, 4]
    assert [i["name"] for i in chunk["inputs"][2:]] == [
        ox.CACHE_IN + o["name"][len(ox.CACHE_OUT) :] for o in chunk["outputs"][1:]
    ]
    for name in (ox.DECODER_FIRST_FILE, ox.DECODER_CHUNK_FILE):  # each conv one Conv node, none rerouted time-last
        ox.check_graph(tmp_path / name)
        graph = onnx.load(tmp_path / name).graph
        made_by = {output: node.op_type for node in graph.node for output in node.output}
        assert all(made_by.get(node.input[0]) != "Transpose" for node in graph.node if node.op_type == "Conv")


ONNX_TYPES = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "bool": "BOOL", "int64": "INT64"}


def _described(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tensor.elem_type)
    return {"name": value.name, "shape": [d.dim_value for d in tensor.shape.dim], "dtype": dtype}


def test_cli_writes_the_graphs_and_manifest(tmp_path) -> None:
    # bfloat16, the TensorRT dtype: onnxruntime cannot run it (ONNX's Conv takes bf16 from opset 22), so the graphs'
    # declared inputs and outputs are checked against the manifest instead
    out = tmp_path / "export"
    argv = "export onnx --model wan-tiny --bucket 32x32x5 --fp8 --bf16-blocks 1 --dtype bfloat16 --no-progress -o"
    assert main([*argv.split(), str(out)]) == 0
    manifest = json.loads((out / ox.MANIFEST_FILE).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ox.DIT_FILE, ox.DECODER_FIRST_FILE, ox.DECODER_CHUNK_FILE, ox.MANIFEST_FILE]
    )
    assert manifest["bucket"] == {"width": 32, "height": 32, "frames": 5, "batch": 1}
    assert manifest["model"]["name"] == "wan-tiny" and len(manifest["model"]["weights_sha256"]) == 64
    assert (manifest["opset"], manifest["dtype"], manifest["attention"]) == (ox.OPSET, "bfloat16", {"form": "sdpa"})
    assert manifest["fp8"]["layers"] and not any(n.startswith("blocks.1.") for n in manifest["fp8"]["layers"])
    x = manifest["graphs"]["dit"]["inputs"][0]
    assert x == {"name": "x", "shape": [1, 16, 2, 4, 4], "dtype": "bfloat16"}
    assert manifest["decode"]["latent_frames"] == 2 and manifest["decode"]["cache"]
    for entry in manifest["graphs"].values():
        graph = onnx.load(out / entry["file"]).graph
        for declared, described in ((graph.input, entry["inputs"]), (graph.output, entry["outputs"])):
            assert [_described(v) for v in declared] == [d | {"dtype": ONNX_TYPES[d["dtype"]]} for d in described]


def test_bad_buckets_and_options_are_named() -> None:
    assert ox.parse_bucket("1280x720x49") == ox.Bucket(1280, 720, 49)
    for text, words in [("1280x720", "width x height x frames"), ("1280x720x48", "4*L - 3"), ("100x64x5", "16")]:
        with pytest.raises(ValueError, match=words):
            ox.parse_bucket(text)
    with pytest.raises(ValueError, match="attention form"):
        ox.export_generator(nn.Identity(), {}, "unused.onnx", attention="flash")
    with pytest.raises(ValueError, match="needs fp8"):
        ox.export_model("wan-tiny", BUCKET, "unused", fp8_keep_blocks=(0,))
