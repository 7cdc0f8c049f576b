"""The TensorRT backend (ONNX export -> FP8 engine): an optional import, not built and not verified.

TensorRT cannot be installed on the machines this project is developed and tested on, so this backend only says so.
"""

from __future__ import annotations

from torch import nn

MISSING_MESSAGE = "tensorrt backend needs the tensorrt package; not available here"


def prepare_tensorrt(module: nn.Module, **options) -> nn.Module:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise ValueError(MISSING_MESSAGE) from None
    raise ValueError(
        "tensorrt backend: the ONNX export and engine build are not implemented yet (unverified); use 'compiled'"
    )
