"""FP8 (e4m3) linear layers for inference: per-output-channel weight scales, per-token dynamic activation scales.

On a Hopper-class GPU the matmul is `torch._scaled_mm` with row-wise scales; elsewhere the same quantised values are
dequantised and multiplied in fp32, so CPU tests measure the real FP8 numerics. Embeddings, modulation and the final
layer stay in higher precision (`quantize_model`'s default skip list), as DESIGN.md section 6 says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aptserve.kernels import triton_fp8
from aptserve.kernels.fp8 import FP8_DTYPE
from aptserve.kernels.fp8 import quantize_fp8_rows as quantize_rows

# cuBLASLt / CUTLASS FP8 GEMMs need both the reduction (K) and output (N) dims to be multiples of 16.
_SCALED_MM_MULTIPLE = 16
# Row-wise scaled GEMMs (one scale per row of A and per column of B) ship for sm90 (Hopper) in torch's CUTLASS path.
SCALED_MM_MIN_CAPABILITY = (9, 0)

# MMDiT modules that keep their original precision: embeddings, the shared/final modulation and the final projection.
# Per-block modulation tables are parameters, not linears, so they are never touched.
DIT_SKIP = ("video_embed", "text_embed", "time_embed", "pooled_text_embed", "shared_mod", "final_mod", "final_proj")


class FP8Linear(nn.Module):
    """`y = x W^T + b` with W in e4m3 (one fp32 scale per output channel) and x quantised per token on the fly.

    The weight is kept as raw e4m3 bytes (a uint8 buffer) so that `module.to(dtype)` cannot silently cast it, and the
    scales stay fp32 through such casts too (`_apply`); only the bias follows the module's dtype. Inference only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fast_accum: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Hopper's fast accumulation skips periodic fp32 promotion: faster, but error grows with K; off by default.
        self.fast_accum = fast_accum
        self.register_buffer("weight_bits", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))  # (N,)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = False) -> FP8Linear:
        """Quantise an `nn.Linear` (on its device); the bias keeps the linear's dtype."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, fast_accum)
        weight_fp8, scale = quantize_rows(linear.weight)  # per output channel = per row of W (N, K)
        layer.weight_bits = weight_fp8.view(torch.uint8)
        layer.weight_scale = scale.view(-1)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def _apply(self, fn, recurse: bool = True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_scale.device)  # moved like the rest, but never down-cast
        return self

    @property
    def weight_e4m3(self) -> torch.Tensor:
        return self.weight_bits.view(FP8_DTYPE)  # (N, K)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer actually multiplies by, in fp32: (N, K)."""
        return self.weight_e4m3.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}); got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        out = self._scaled_mm(x2) if self._can_use_scaled_mm(x) else self._emulated(x2)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _can_use_scaled_mm(self, x: torch.Tensor) -> bool:
        if not x.is_cuda or self.in_features % _SCALED_MM_MULTIPLE or self.out_features % _SCALED_MM_MULTIPLE:
            return False
        props = torch.cuda.get_device_properties(x.device)  # torch.compile constant-folds this call
        return (props.major, props.minor) >= SCALED_MM_MIN_CAPABILITY

    def _scaled_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """Row-wise scaled FP8 GEMM: A row-major (M, K), B column-major (K, N), scales (M, 1) and (1, N), bf16 out."""
        x_fp8, x_scale = triton_fp8.quantize_rows(x2)  # one fused pass on CUDA, the same bits as quantize_rows
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)  # the rowwise kernel adds a bf16 bias
        return torch._scaled_mm(
            x_fp8.contiguous(),
            self.weight_e4m3.t(),  # (N, K) row-major is (K, N) column-major: no copy
            scale_a=x_scale,
            scale_b=self.weight_scale.view(1, -1),
            bias=bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )  # (M, N)

    def _emulated(self, x2: torch.Tensor) -> torch.Tensor:
        """The same quantised operands multiplied exactly in fp32, scales applied afterwards as the GPU epilogue does."""
        x_fp8, x_scale = quantize_rows(x2)
        out = (x_fp8.float() @ self.weight_e4m3.float().t()) * x_scale * self.weight_scale  # (M, N)
        return out if self.bias is None else out + self.bias.float()


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


@torch.no_grad()
def quantize_model(model: nn.Module, skip: Sequence[str] = DIT_SKIP, fast_accum: bool = False) -> int:
    """Replace every `nn.Linear` whose qualified name is not under a `skip` prefix by an `FP8Linear`, in place.

    Returns how many layers were replaced. Each replaced bf16 weight is released as soon as its FP8 copy exists, so
    quantising an 8B model on the GPU needs about one layer of extra memory.
    """
    targets = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not _skipped(name, skip)
    ]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, FP8Linear.from_linear(getattr(parent, attr), fast_accum))
    return len(targets)


def quantized_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, FP8Linear)]
