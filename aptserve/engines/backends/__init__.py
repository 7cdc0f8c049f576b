"""How the generator and VAE run: one explicit chooser, `prepare(target, backend, ...)`.

    prepare(pipeline, "compiled", attention="triton", fp8=True, channels_last=True)

`target` is a Pipeline or LoadedModel (anything with `.dit` / `.vae` modules), one module, or a list or dict of them;
it is changed in place and returned. Backends: `eager` (as built), `compiled` (torch.compile, see `compiled.py`),
`tensorrt` (optional import; raises ValueError when TensorRT is missing, which it is on these machines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from aptserve.engines.backends.compiled import prepare_compiled
from aptserve.engines.backends.eager import prepare_eager
from aptserve.engines.backends.tensorrt import prepare_tensorrt

BACKENDS = ("eager", "compiled", "tensorrt")
_PREPARE = {"eager": prepare_eager, "compiled": prepare_compiled, "tensorrt": prepare_tensorrt}

T = TypeVar("T")


def modules_of(target: Any) -> list[nn.Module]:
    """The modules a backend acts on: the target itself, its list/dict values, or its `.dit` and `.vae`."""
    if isinstance(target, nn.Module):
        return [target]
    if isinstance(target, Mapping):
        return list(target.values())
    if isinstance(target, (list, tuple)):
        return list(target)
    found = [getattr(target, name) for name in ("dit", "vae") if isinstance(getattr(target, name, None), nn.Module)]
    if not found:
        raise ValueError(f"nothing to prepare in {type(target).__name__}: expected modules or an object with .dit/.vae")
    return found


def prepare(
    target: T,
    backend: str = "eager",
    *,
    attention: str | None = None,
    fp8: bool = False,
    channels_last: bool = False,
    fp8_keep_blocks: Sequence[int] = (),
    **backend_options: Any,
) -> T:
    """Make `target` run on `backend` with the given options (see `eager.apply_options`); returns `target`.

    Extra keyword arguments go to the backend: for `compiled`, `mode`, `compiler` and `cuda_graphs`; for
    `tensorrt` (unverified), `onnx_dir` and `cache_dir`.
    """
    if backend not in _PREPARE:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend not in ("compiled", "tensorrt") and backend_options:
        raise ValueError(
            f"options {sorted(backend_options)} apply to the compiled and tensorrt backends, not {backend!r}"
        )
    for module in modules_of(target):
        options = {
            "attention": attention,
            "fp8": fp8,
            "channels_last": channels_last,
            "fp8_keep_blocks": fp8_keep_blocks,
        }
        _PREPARE[backend](module, **options, **backend_options)
    return target


__all__ = ["BACKENDS", "modules_of", "prepare"]
