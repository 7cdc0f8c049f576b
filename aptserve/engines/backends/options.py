"""How a served model runs, as one value: backend, attention, FP8 linears, CUDA graphs, memory format, decoder.

The server builds it from its settings, `bench/gpu_check.py` from its fast-path rows; both apply it with `apply` (one
`prepare` call), so what is benchmarked is what is served. `check` rejects a combination that cannot run on a device
before anything is loaded, with one line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from aptserve import kernels
from aptserve.engines.backends import BACKENDS, prepare
from aptserve.engines.backends.tensorrt import MISSING_MESSAGE, tensorrt_version
from aptserve.engines.pipeline import DECODERS
from aptserve.engines.quant import SCALED_MM_MIN_CAPABILITY
from aptserve.kernels._triton import INTERPRETED

COMPILERS = ("inductor", "aot_eager")


@dataclass(frozen=True)
class RunOptions:
    backend: str = "eager"
    attention: str = "auto"
    fp8_linears: bool = False
    bf16_blocks: tuple[int, ...] = ()  # generator blocks whose linears stay in bf16 when fp8_linears is on
    fp8_emulation: bool = False  # allow FP8 linears where the hardware has no FP8 GEMM (slow; for tests and CPUs)
    cuda_graphs: bool = False
    channels_last: bool = False
    compiler: str = "inductor"  # torch.compile backend for backend="compiled"
    decoder: str = "full"
    # backend="tensorrt" (unverified): the folder `aptserve export onnx` wrote, whose engines run the generator and
    # decoder (built on first use and cached)
    tensorrt_dir: str | None = None

    def __post_init__(self) -> None:
        _one_of("backend", self.backend, BACKENDS)
        _one_of("attention", self.attention, kernels.ATTENTION_IMPLS)
        _one_of("compiler", self.compiler, COMPILERS)
        _one_of("decoder", self.decoder, DECODERS)
        if any(b < 0 for b in self.bf16_blocks):
            raise ValueError(f"bf16_blocks are block indices >= 0; got {list(self.bf16_blocks)}")

    def check(self, device: str, depth: int | None = None) -> None:
        """Raise ValueError (one line) when this combination cannot run on `device` for a generator of `depth`."""
        cuda = device.startswith("cuda")
        if self.backend == "tensorrt":
            if tensorrt_version() is None:
                raise ValueError(MISSING_MESSAGE)
            if not cuda or not self.tensorrt_dir:
                raise ValueError(
                    "backend=tensorrt runs on CUDA from tensorrt_dir, the folder aptserve export onnx wrote"
                )
        elif self.tensorrt_dir:
            raise ValueError("tensorrt_dir names engines for backend=tensorrt; set that backend or drop it")
        if self.cuda_graphs and not cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device; this server runs on {device}")
        if self.cuda_graphs and self.backend != "compiled":
            raise ValueError("cuda_graphs are captured by the compiled backend; set backend=compiled")
        if self.fp8_linears and not self.fp8_emulation and not _has_fp8_gemm(device):
            raise ValueError(
                f"fp8_linears needs a GPU with FP8 GEMMs (torch._scaled_mm, sm_90 or newer); {device} has none: "
                "set fp8_emulation to run the slow emulation anyway"
            )
        if self.bf16_blocks and not self.fp8_linears:
            raise ValueError("bf16_blocks lists blocks kept out of FP8, so it needs fp8_linears")
        if depth is not None and any(b >= depth for b in self.bf16_blocks):
            raise ValueError(f"bf16_blocks {list(self.bf16_blocks)} name blocks the generator lacks (it has {depth})")
        if self.attention.startswith("triton") and not cuda and not INTERPRETED:
            raise ValueError(f"attention={self.attention} is a Triton kernel: it needs CUDA (or TRITON_INTERPRET=1)")

    def apply(self, target: Any) -> Any:
        """One `prepare` call: the backend with every option (see `aptserve.engines.backends.prepare`)."""
        compiled = {"compiler": self.compiler, "cuda_graphs": self.cuda_graphs} if self.backend == "compiled" else {}
        if self.backend == "tensorrt":
            compiled = {"onnx_dir": self.tensorrt_dir}
        return prepare(
            target,
            self.backend,
            attention=self.attention,
            fp8=self.fp8_linears,
            fp8_keep_blocks=self.bf16_blocks,
            channels_last=self.channels_last,
            **compiled,
        )

    def describe(self) -> dict[str, Any]:
        """Every option by name, for build_info, /v1/models and logs."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _has_fp8_gemm(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    # the capability at which FP8Linear takes torch._scaled_mm; below it, it falls back to its emulation
    return torch.cuda.get_device_capability(torch.device(device)) >= SCALED_MM_MIN_CAPABILITY
