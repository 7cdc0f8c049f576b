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
try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

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


@jit
def round_to_e4m3(x):
    """fp32 values (already within +-448) rounded to e4m3's grid, ties to even, as the GPU's `cvt.rn` rounds.

    The interpreter's fp8 cast truncates; rounding first makes that cast exact. The grid: 3 mantissa bits for
    normals (from 2^-6), steps of 2^-9 below.
    """
    mag = tl.abs(x)
    ulp = tl.math.exp2(tl.math.floor(tl.math.log2(tl.maximum(mag, 0.015625))) - 3.0)
    steps = mag / ulp
    low = tl.math.floor(steps)
    frac = steps - low
    odd = (low - 2.0 * tl.math.floor(low * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(x < 0, -1.0, 1.0) * tl.where(up, low + 1.0, low) * ulp
