"""The TensorRT backend: what runs without TensorRT is checked here (manifest reading, engine cache keys, paths and
atomic writes, profile shapes, IO binding, the one-line error when TensorRT is missing). Building and running engines
needs TensorRT and a GPU: those tests skip with the reason (TensorRT cannot be installed on these machines).
"""

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from aptserve.engines.backends import prepare
from aptserve.engines.backends.tensorrt import MISSING_MESSAGE, prepare_tensorrt, tensorrt_version
from aptserve.engines.backends.tensorrt.build import build_engine, profile_shapes
from aptserve.engines.backends.tensorrt.cache import EngineKey, engine_key, engine_path, load_engine, save_engine
from aptserve.engines.backends.tensorrt.manifest import read_manifest
from aptserve.engines.backends.tensorrt.runtime import (
    DECODER_FIRST_GRAPH,
    DECODER_GRAPH,
    TensorRTDecoder,
    bind,
    decoder_feeds,
)
from aptserve.engines.dit import DIT_PRESETS, MMDiT
from aptserve.engines.onnx_export import export_decoder
from aptserve.engines.vae import VAE_PRESETS, CausalVAE, DecodeCache

X_SHAPE = [1, 16, 3, 4, 4]  # bucket 32x32x9
CACHE = [1, 16, 2, 4, 4]


def _tensor(name: str, shape: list[int], dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


# As `engines.onnx_export.export_model` writes it (fields the backend does not read left out).
MANIFEST = {
    "format": "aptserve-onnx/1",
    "model": {"name": "tiny", "arch": "mmdit", "weights_sha256": "ab" * 32},
    "bucket": {"width": 32, "height": 32, "frames": 9, "batch": 1},
    "opset": 19,
    "dtype": "float32",
    "fp8": None,
    "attention": {"form": "sdpa"},
    "graphs": {
        "dit": {
            "file": "dit.onnx",
            "inputs": [
                _tensor("x", X_SHAPE),
                _tensor("t", [1]),
                _tensor("text", [1, 32, 384]),
                _tensor("text_mask", [1, 32], "bool"),
            ],
            "outputs": [_tensor("velocity", X_SHAPE)],
        },
        "vae_decoder_first": {
            "file": "vae_decoder_first.onnx",
            "inputs": [_tensor("latent", [1, 16, 1, 4, 4])],
            "outputs": [_tensor("video", [1, 3, 1, 32, 32]), _tensor("cache_out.stem", CACHE)],
        },
        "vae_decoder_chunk": {
            "file": "vae_decoder_chunk.onnx",
            "inputs": [
                _tensor("latent", [1, 16, 1, 4, 4]),
                _tensor("latent_index", [1], "int64"),
                _tensor("cache_in.stem", CACHE),
            ],
            "outputs": [_tensor("video", [1, 3, 4, 32, 32]), _tensor("cache_out.stem", CACHE)],
        },
    },
}


def _write(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def manifest(tmp_path):
    _write(tmp_path, MANIFEST)
    return read_manifest(tmp_path)


def _key(**changes) -> EngineKey:
    fields = {
        "model_hash": "ab" * 32,
        "graph": "dit",
        "bucket": "32x32x9",
        "batch": 1,
        "export": "ef" * 32,
        "gpu": "NVIDIA H100 80GB HBM3",
        "tensorrt_version": "11.4.0.106",
    }
    return EngineKey(**{**fields, **changes})


# ----------------------------------------------------------------------------------------------------------------------
# Manifest


def test_manifest_is_read_with_its_graphs(manifest) -> None:
    assert (manifest.model, manifest.model_hash, manifest.bucket, manifest.batch) == ("tiny", "ab" * 32, "32x32x9", 1)
    assert (manifest.dtype, manifest.fp8, manifest.attention) == ("float32", False, "sdpa")
    dit = manifest.graph("dit")
    assert [s.name for s in dit.inputs] == ["x", "t", "text", "text_mask"]
    assert dit.inputs[0].shape == tuple(X_SHAPE) and dit.inputs[3].dtype == "bool"
    assert set(manifest.graphs) == {"dit", DECODER_FIRST_GRAPH, DECODER_GRAPH}
    with pytest.raises(ValueError, match="has no graph 'vae_encoder'"):
        manifest.graph("vae_encoder")


def test_manifest_digest_follows_what_changes_a_graph(manifest, tmp_path) -> None:
    for change in (
        {"fp8": {"layers": ["blocks.0.attn.qkv"]}},
        {"attention": {"form": "plugin"}},
        {"dtype": "bfloat16"},
    ):
        _write(tmp_path, {**MANIFEST, **change})
        assert read_manifest(tmp_path).digest != manifest.digest
    _write(tmp_path, {**MANIFEST, "fp8": {"layers": []}, "attention": {"form": "plugin"}})
    assert (read_manifest(tmp_path).fp8, read_manifest(tmp_path).attention) == (True, "plugin")


def test_bad_manifests_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="export the model first"):
        read_manifest(tmp_path)
    _write(tmp_path, {**MANIFEST, "format": "aptserve-onnx/0"})
    with pytest.raises(ValueError, match=r"format 'aptserve-onnx/0'.*export again"):
        read_manifest(tmp_path)
    _write(tmp_path, {**MANIFEST, "model": {"name": "tiny"}})
    with pytest.raises(ValueError, match="weights_sha256"):
        read_manifest(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Engine cache


def test_engine_key_covers_weights_graph_bucket_export_gpu_and_version(manifest) -> None:
    key = engine_key(manifest, "dit", "NVIDIA H100 80GB HBM3", "11.4.0.106")
    assert key == _key(export=manifest.digest)
    assert key.digest() == _key(export=manifest.digest).digest()  # deterministic
    changes = [
        {"model_hash": "cd" * 32},
        {"graph": "vae_decoder_chunk"},
        {"bucket": "1280x720x49"},
        {"batch": 2},
        {"export": "01" * 32},
        {"gpu": "NVIDIA H200"},
        {"tensorrt_version": "10.13.3.9"},
    ]
    digests = {_key().digest()} | {_key(**change).digest() for change in changes}
    assert len(digests) == len(changes) + 1
    assert key.filename() == f"dit-32x32x9-b1-{key.digest()[:16]}.engine"


def test_engine_key_refuses_unsafe_or_empty_fields(manifest) -> None:
    with pytest.raises(ValueError, match="bucket must be WxHxF"):
        _key(bucket="../../etc")
    with pytest.raises(ValueError, match="graph name"):
        _key(graph="dit/../x")
    with pytest.raises(ValueError, match="GPU name"):
        _key(gpu="")
    with pytest.raises(ValueError, match="batch >= 1"):
        _key(batch=0)
    with pytest.raises(ValueError, match="has no graph"):
        engine_key(manifest, "vae_encoder", "gpu", "11.4")


def test_engine_is_saved_and_found_under_its_key(tmp_path) -> None:
    cache_dir = tmp_path / "engines"
    key = _key()
    assert load_engine(cache_dir, key) is None
    path = save_engine(cache_dir, key, b"engine bytes")
    assert path == engine_path(cache_dir, key) and path.parent == cache_dir
    assert load_engine(cache_dir, key) == b"engine bytes"
    assert json.loads(path.with_suffix(".json").read_text())["gpu"] == "NVIDIA H100 80GB HBM3"
    assert load_engine(cache_dir, _key(gpu="NVIDIA H200")) is None  # another GPU's engine is not this one's
    save_engine(cache_dir, key, b"rebuilt")
    assert load_engine(cache_dir, key) == b"rebuilt"
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


def test_failed_write_leaves_the_old_engine_and_no_temporary_file(tmp_path, monkeypatch) -> None:
    key = _key()
    path = save_engine(tmp_path, key, b"old engine")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_engine(tmp_path, key, b"new engine")
    monkeypatch.undo()
    assert path.read_bytes() == b"old engine"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="empty engine"):
        save_engine(tmp_path, key, b"")


# ----------------------------------------------------------------------------------------------------------------------
# Build and runtime logic that needs no TensorRT


def test_profile_shapes_fill_dynamic_inputs_from_the_bucket(manifest) -> None:
    dit = manifest.graph("dit")
    static = {s.name: s.shape for s in dit.inputs}
    assert profile_shapes(static, dit) == {}  # a static export needs no profile
    dynamic = {**static, "x": (-1, 16, -1, 4, 4)}
    assert profile_shapes(dynamic, dit) == {"x": tuple(X_SHAPE)}
    with pytest.raises(ValueError, match=r"input x is \(1, 16, 9, 4, 4\) in the graph"):
        profile_shapes({**static, "x": (1, 16, 9, 4, 4)}, dit)
    with pytest.raises(ValueError, match="'sigma' is not among"):
        profile_shapes({**static, "sigma": (1,)}, dit)


def test_plugin_export_in_fp32_is_refused_before_any_build(tmp_path) -> None:
    _write(tmp_path, {**MANIFEST, "attention": {"form": "plugin"}})
    with pytest.raises(ValueError, match=r"plugin in a float32 graph.*--dtype bfloat16"):
        build_engine(read_manifest(tmp_path), "dit")


def test_inputs_bind_by_name_and_must_be_the_bucket(manifest) -> None:
    dit = manifest.graph("dit")
    values = [torch.zeros(X_SHAPE), torch.ones(1), torch.zeros(1, 32, 384), torch.ones(1, 32, dtype=torch.bool)]
    assert list(bind(dit.inputs, values, "dit")) == ["x", "t", "text", "text_mask"]
    with pytest.raises(ValueError, match=r"built for x of shape \(1, 16, 3, 4, 4\) \(its bucket\); got \(1, 16, 9"):
        bind(dit.inputs, [torch.zeros(1, 16, 9, 4, 4), *values[1:]], "dit")
    with pytest.raises(ValueError, match="takes"):
        bind(dit.inputs, values[:3], "dit")


def test_decoder_feeds_index_and_cache_by_name(manifest) -> None:
    first, chunk = manifest.graph(DECODER_FIRST_GRAPH), manifest.graph(DECODER_GRAPH)
    latent, past = torch.zeros(1, 16, 1, 4, 4), torch.ones(CACHE)
    assert list(decoder_feeds(first, DECODER_FIRST_GRAPH, latent, DecodeCache())) == ["latent"]
    feeds = decoder_feeds(chunk, DECODER_GRAPH, latent, DecodeCache({"stem": past}, latent_frames_decoded=2))
    assert list(feeds) == ["latent", "latent_index", "cache_in.stem"]
    assert feeds["latent_index"].tolist() == [2] and feeds["latent_index"].dtype == torch.int64
    assert feeds["cache_in.stem"] is past
    with pytest.raises(ValueError, match=r"takes 'cache_in.stem'.*starts with vae_decoder_first"):
        decoder_feeds(chunk, DECODER_GRAPH, latent, DecodeCache(latent_frames_decoded=1))
    with pytest.raises(ValueError, match=r"built for latent of shape \(1, 16, 1, 4, 4\)"):
        decoder_feeds(first, DECODER_FIRST_GRAPH, torch.zeros(1, 16, 2, 4, 4), DecodeCache())


def test_streamed_decode_through_the_runtime_glue_equals_torch(tmp_path) -> None:
    """TensorRTDecoder's graph choice, names, latent index and cache threading over a whole clip, on the exported
    decoder graphs run by onnxruntime in place of TensorRT engines (which cannot run here): equal to torch's decode.
    It checks this module's glue, not TensorRT."""
    ort = pytest.importorskip("onnxruntime", reason="runs the exported decoder graphs on the CPU")
    vae = CausalVAE(VAE_PRESETS["tiny"]).eval()
    latent = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    graphs = export_decoder(vae, latent[:, :, :1], tmp_path)

    def run_graph(name: str):
        session = ort.InferenceSession(str(tmp_path / graphs[name]["file"]), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(
            zip(names, map(torch.from_numpy, session.run(None, {k: v.numpy() for k, v in feeds.items()})))
        )

    _write(tmp_path, {**MANIFEST, "graphs": graphs})  # the exporter's own graph entries, through the reader
    manifest = read_manifest(tmp_path)
    first, chunk = ((run_graph(name), manifest.graph(name)) for name in (DECODER_FIRST_GRAPH, DECODER_GRAPH))
    decoder = TensorRTDecoder(first, chunk)
    cache, chunks = DecodeCache(), []
    for index in range(latent.shape[2]):
        video, cache = decoder.decode_chunk(latent[:, :, index : index + 1], cache)
        chunks.append(video)
    with torch.no_grad():
        expected = torch.cat(list(vae.decode_chunks(latent)), dim=2)
    torch.testing.assert_close(torch.cat(chunks, dim=2), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Selecting the backend


def test_missing_tensorrt_is_one_actionable_line(tmp_path) -> None:
    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    dit = MMDiT(DIT_PRESETS["tiny"])
    for select in (lambda: prepare(dit, "tensorrt"), lambda: prepare_tensorrt(dit, onnx_dir=tmp_path)):
        with pytest.raises(ValueError) as error:
            select()
        message = str(error.value)
        assert message == MISSING_MESSAGE and "\n" not in message
        assert "pip install tensorrt-cu13" in message and "nvcr.io/nvidia/tensorrt" in message


def test_tensorrt_is_imported_only_inside_functions() -> None:
    # importing aptserve (which imports every backend) must work without TensorRT: no module-level import of it
    import aptserve.engines.backends.tensorrt as package
    import aptserve.kernels.trt_plugin as plugin  # needs Triton only

    files = [*Path(package.__file__).parent.glob("*.py"), Path(plugin.__file__)]
    for path in files:
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [getattr(node, "module", "")]
            assert not any((name or "").split(".")[0] == "tensorrt" for name in names), (
                f"{path.name}: {ast.unparse(node)}"
            )


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("attention", "dtype", "tol"), [("sdpa", torch.float32, 1e-3), ("plugin", torch.bfloat16, 3e-2)]
)
def test_engines_run_the_exported_tiny_model_like_torch(attention, dtype, tol, tmp_path) -> None:
    pytest.importorskip(
        "tensorrt", reason="TensorRT cannot be installed here: the engine build and runtime are unverified"
    )
    from aptserve.engines.loading import load_model
    from aptserve.engines.onnx_export import export_model, generator_inputs, parse_bucket

    export_model("tiny", "64x64x17", tmp_path / "export", attention=attention, dtype=dtype)
    loaded = load_model("tiny", device="cuda", dtype=dtype)  # the same seed-0 weights the export wrote
    dit, vae = loaded.dit.eval(), loaded.vae.eval()
    inputs = [v.cuda() for v in generator_inputs(loaded.config, parse_bucket("64x64x17"), dtype).values()]
    with torch.no_grad():
        velocity = dit(*inputs)
        frames = torch.cat(list(vae.decode_chunks(velocity)), dim=2)
        for module in (dit, vae):
            prepare_tensorrt(module, onnx_dir=tmp_path / "export", cache_dir=tmp_path / "engines")
        torch.testing.assert_close(dit(*inputs), velocity, atol=tol, rtol=tol)
        torch.testing.assert_close(torch.cat(list(vae.decode_chunks(velocity)), dim=2), frames, atol=tol, rtol=tol)
    assert len(list((tmp_path / "engines").glob("*.engine"))) == 3
