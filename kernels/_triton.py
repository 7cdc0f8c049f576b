"""Triton, if installed, and whether this process runs its kernels under the interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False

# Without triton a kernel stays a plain function (never called: each module's unsupported_reason says why); postponed
# annotations keep its `tl.constexpr` hints from being evaluated.
jit = triton.jit if HAS_TRITON else (lambda fn: fn)


def _interpret_requested() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# triton.jit picks compiled vs interpreted when it decorates, and triton decorates its own tl.max/tl.sum when it is
# imported, so TRITON_INTERPRET must be set before `import triton`; setting it later has no effect on this process.
INTERPRETED = HAS_TRITON and _interpret_requested()
