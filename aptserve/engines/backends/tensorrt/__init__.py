"""The TensorRT backend: the graphs `aptserve export onnx` writes -> engines (strongly typed, so FP8 wherever the
graph's Q/DQ put it; one per bucket; cached per model, bucket, GPU and TensorRT version) -> the generator's forward and
the VAE's decode_chunk running those engines.

    prepare_tensorrt(pipeline.dit, onnx_dir="exports/tiny-256x144x9")    # builds or loads engines, then runs them
    prepare_tensorrt(pipeline.vae, onnx_dir="exports/tiny-256x144x9")

Files: `manifest.py` (what the export wrote), `cache.py` (engine cache), `build.py` (ONNX -> engine), `runtime.py`
(engines behind the backend interface). Verified on CPU here: the manifest reader, cache keys, paths and atomic
writes, the profile shapes and the IO binding checks. Unverified: everything that imports `tensorrt` (the build, the
runtime, the plugin registration): TensorRT cannot be installed where this project is built and tested.

Where it runs: TensorRT >= 10.9 (ahead-of-time plugins) on the CUDA image. The aptserve image (nvidia/cuda 13 base,
torch's CUDA 13 wheels) gets it from PyPI with `pip install tensorrt-cu13` (the `tensorrt-cu13-libs` wheel carries
the libraries; needs the same driver >= 580 as torch); NVIDIA's NGC image `nvcr.io/nvidia/tensorrt:<yy.mm>-py3` has it
preinstalled. `tensorrt` is imported only when this backend is selected.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from aptserve.engines.backends.tensorrt.cache import default_cache_dir

MISSING_MESSAGE = (
    "tensorrt backend needs the tensorrt package; not available here: pip install tensorrt-cu13 (TensorRT >= 10.9, "
    "CUDA 13 like torch's wheels) on a CUDA machine, or run an image based on nvcr.io/nvidia/tensorrt"
)


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when it is missing (or its libraries do not load)."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return tensorrt.__version__


def prepare_tensorrt(
    module: nn.Module, onnx_dir: str | Path | None = None, cache_dir: str | Path | None = None, **options
) -> nn.Module:
    """Run `module` (a generator or a CausalVAE on CUDA) on engines built from the export in `onnx_dir`, in place.

    The export fixed the attention form and FP8 linears, so the eager options are not applied; asking for FP8 from
    an export without it is an error. Engines are cached in `cache_dir` (default: ~/.cache/aptserve/tensorrt).
    Unverified (see the module docstring).
    """
    if tensorrt_version() is None:
        raise ValueError(MISSING_MESSAGE)
    if onnx_dir is None:
        raise ValueError("tensorrt backend (unverified) needs onnx_dir: the folder `aptserve export onnx` wrote")
    from aptserve.engines.backends.tensorrt.manifest import read_manifest
    from aptserve.engines.backends.tensorrt.runtime import attach

    manifest = read_manifest(Path(onnx_dir))
    if options.get("fp8") and not manifest.fp8:
        raise ValueError(f"fp8 was asked for, but {onnx_dir} was exported without --fp8")
    return attach(module, manifest, Path(cache_dir) if cache_dir is not None else default_cache_dir())


__all__ = ["MISSING_MESSAGE", "prepare_tensorrt", "tensorrt_version"]
