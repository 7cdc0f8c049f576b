"""The manifest.json that `aptserve export onnx` (`engines.onnx_export`) writes beside its graphs, as the TensorRT
backend reads it: the model's name and weights hash, the bucket, the export dtype, FP8 and attention form, and each
graph's file with its input and output names, shapes and dtypes.

Graphs: "dit" takes (x, t, text, text_mask) and gives the velocity; "vae_decoder_first" takes latent frame 0 and
gives its video frame and the decode cache ("cache_out.<key>"); "vae_decoder_chunk" takes a later latent frame, its
index ("latent_index") and the cache ("cache_in.<key>") and gives 4 video frames and the next cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aptserve.engines.onnx_export import MANIFEST_FILE

FORMAT = "aptserve-onnx/1"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Manifest:
    folder: Path
    model: str
    model_hash: str  # sha256 of the weights
    bucket: str  # "WxHxF"
    batch: int
    dtype: str  # the export's float dtype ("float32", "bfloat16", "float16")
    fp8: bool
    attention: str  # "sdpa" or "plugin"
    graphs: Mapping[str, GraphSpec]
    digest: str  # sha256 of the whole manifest: changes with anything that changes a graph

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise ValueError(f"{self.folder / MANIFEST_FILE} has no graph {name!r}; it has {sorted(self.graphs)}")
        return self.graphs[name]


def _tensors(raw: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t["name"], tuple(int(d) for d in t["shape"]), t["dtype"]) for t in raw)


def _manifest(folder: Path, raw: dict[str, Any]) -> Manifest:
    bucket = raw["bucket"]
    return Manifest(
        folder=folder,
        model=raw["model"]["name"],
        model_hash=raw["model"]["weights_sha256"],
        bucket=f"{bucket['width']}x{bucket['height']}x{bucket['frames']}",
        batch=int(bucket["batch"]),
        dtype=raw["dtype"],
        fp8=raw["fp8"] is not None,
        attention=raw["attention"]["form"],
        graphs={
            name: GraphSpec(graph["file"], _tensors(graph["inputs"]), _tensors(graph["outputs"]))
            for name, graph in raw["graphs"].items()
        },
        digest=hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest(),
    )


def read_manifest(folder: Path) -> Manifest:
    """The manifest in `folder` (an `aptserve export onnx` output); ValueError naming what is missing or wrong."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: export the model first (aptserve export onnx ... -o {folder})")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} has format {raw.get('format')!r}; this backend reads {FORMAT!r}: export again")
    try:
        return _manifest(folder, raw)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not an aptserve export manifest: bad or missing field {error}") from None
