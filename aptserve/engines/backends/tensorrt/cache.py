"""The engine cache: one serialized TensorRT engine per (weights hash, graph, bucket, export, GPU, TensorRT version),
since an engine only loads on the GPU model and TensorRT version that built it, and the export (its manifest's
digest: dtype, FP8 layers, attention form, opset) decides what the graph computes. Pure Python.

    key = engine_key(manifest, "dit", gpu="NVIDIA H100 80GB HBM3", tensorrt_version="11.4.0.106")
    engine = load_engine(cache_dir, key)  # None on a miss: build, then save_engine(cache_dir, key, engine)

Files are `<graph>-<bucket>-b<batch>-<digest>.engine` with a `.json` beside each naming its key; writes are atomic (a
temporary file in the same folder, fsynced, then renamed), so a reader never sees half an engine and concurrent
builders of the same key leave one whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the manifest module imports the exporter; this one stays pure
    from aptserve.engines.backends.tensorrt.manifest import Manifest

_BUCKET = re.compile(r"\d+x\d+x\d+")
_GRAPH = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class EngineKey:
    model_hash: str
    graph: str
    bucket: str  # "WxHxF"
    batch: int
    export: str  # the manifest's digest
    gpu: str
    tensorrt_version: str

    def __post_init__(self) -> None:
        if not _BUCKET.fullmatch(self.bucket):
            raise ValueError(f"bucket must be WxHxF (e.g. 1280x720x49); got {self.bucket!r}")
        if not _GRAPH.fullmatch(self.graph):
            raise ValueError(f"graph name must be lower-case letters, digits and _; got {self.graph!r}")
        if not (self.model_hash and self.export and self.gpu and self.tensorrt_version) or self.batch < 1:
            raise ValueError(f"an engine key needs hashes, a GPU name, a TensorRT version and batch >= 1; got {self}")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def filename(self) -> str:
        return f"{self.graph}-{self.bucket}-b{self.batch}-{self.digest()[:16]}.engine"


def engine_key(manifest: Manifest, graph: str, gpu: str, tensorrt_version: str) -> EngineKey:
    """The key of `graph` of this export built on `gpu` (its CUDA device name) with this TensorRT version."""
    manifest.graph(graph)  # raises if the export lacks it
    return EngineKey(
        manifest.model_hash, graph, manifest.bucket, manifest.batch, manifest.digest, gpu, tensorrt_version
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aptserve" / "tensorrt"


def engine_path(cache_dir: Path, key: EngineKey) -> Path:
    return cache_dir / key.filename()


def load_engine(cache_dir: Path, key: EngineKey) -> bytes | None:
    """The cached engine for `key`, or None."""
    path = engine_path(cache_dir, key)
    return path.read_bytes() if path.is_file() else None


def save_engine(cache_dir: Path, key: EngineKey, engine: bytes) -> Path:
    """Store `engine` under `key` atomically (its key file first, so every engine file has one); returns its path."""
    if not engine:
        raise ValueError(f"refusing to cache an empty engine for {key.graph} {key.bucket}")
    path = engine_path(cache_dir, key)
    _atomic_write(path.with_suffix(".json"), json.dumps(asdict(key), indent=2, sort_keys=True).encode())
    _atomic_write(path, engine)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
