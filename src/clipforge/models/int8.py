"""Opt-in int8 inference: linear layers as int8 x int8 -> int32 matrix products, on CPUs where that is fast.

`quantize_int8(model)` returns `for_inference(model)` (QuickGELU folded into the MLPs, BatchNorms into the
convolutions, channels-last ResNet) with every `Attention` and `nn.Linear` swapped for an int8 version: the
attention and MLP projections are about 70% of a ViT's time on a CPU. One arithmetic, whatever runs it:

- weights quantized once, per output channel; activations per row (token) at every call; both symmetric,
  `round(v * 127 / max|row|)` in [-127, 127];
- their products summed exactly in int32 (`torch._int_mm`);
- the int32 sums converted to fp32, multiplied by the two scales, the fp32 bias added.

`torch._int_mm` is fast on a CPU only where PyTorch hands it to oneDNN, which it does on CPUs with
AVX512-VNNI; elsewhere (AVX2-only x86, ARM) it is a plain loop, some 25x slower than an fp32 matmul. There
`quantize_int8` warns once and keeps the fp32 layers, so int8 is never the slower choice. Convolutions,
LayerNorms and attention itself stay fp32: an int8 convolution (im2col + `_int_mm`) measured slower than
oneDNN's fp32 one. docs/int8.md has the measurements.

Inference only: the copy cannot train, and its state dict is not OpenAI's layout; save the float model.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from clipforge.models.inference import for_inference
from clipforge.models.layers import Attention

__all__ = ["Int8Attention", "Int8Linear", "fast_int8_matmul", "quantize_int8"]

_LEVELS = 127.0  # symmetric: -127..127, so negating a value never overflows


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and fp32 scales (one per row of the last dimension) with x ~= values * scales."""
    peak = x.abs().amax(dim=-1, keepdim=True).float().clamp_min_(1e-12)
    # |x| <= peak in every row, so |x * 127 / peak| <= 127 after rounding: no clamp needed.
    return (x * (_LEVELS / peak)).round_().to(torch.int8), peak / _LEVELS


class Int8Linear(nn.Module):
    """`y = x W^T + b` with W and x in int8 (per-channel / per-row scales), accumulated in int32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        values, scale = _quantize_rows(weight.detach().float())
        # [in, out] as a transposed view of the row-major [out, in]: the layout _int_mm runs fastest on.
        self.register_buffer("weight_int8", values.t(), persistent=False)
        self.register_buffer("weight_scale", scale.t(), persistent=False)  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        values, scale = _quantize_rows(rows)
        y = torch._int_mm(values, self.weight_int8).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Attention(Attention):
    """`Attention` whose QKV and output projections are `Int8Linear`s (same forward otherwise)."""

    def __init__(self, attention: Attention) -> None:
        nn.Module.__init__(self)  # not Attention.__init__: no float parameters to allocate
        self.heads = attention.heads
        self.in_proj = Int8Linear(attention.in_proj_weight, attention.in_proj_bias)
        self.out_proj = Int8Linear.from_linear(attention.out_proj)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x)


@functools.cache
def fast_int8_matmul() -> bool:
    """Whether `torch._int_mm` runs oneDNN's int8 kernel on this CPU rather than a plain loop.

    PyTorch's own test for that, read from the CPU (not from any ISA limit set in the environment): oneDNN
    is built in and the CPU has AVX512-VNNI, whose int8 dot products accumulate in int32 without saturating.
    """
    has_vnni = getattr(torch.cpu, "_is_vnni_supported", None)  # private: absent means "unknown", so no
    return torch.backends.mkldnn.is_available() and has_vnni is not None and bool(has_vnni())


def quantize_int8(model: nn.Module, convolutions: bool = False) -> nn.Module:
    """`for_inference(model)` with every `Attention` and `nn.Linear` replaced by its int8 version, on a CPU
    where int8 matrix products are fast (`fast_int8_matmul`); elsewhere it warns and keeps them fp32.

    `convolutions` has no effect (int8 convolutions were slower than fp32 ones); True warns."""
    if convolutions:
        warnings.warn("quantize_int8: convolutions=True has no effect; convolutions stay fp32", stacklevel=2)
    quantized = for_inference(model)
    on_cpu = all(p.device.type == "cpu" for p in quantized.parameters())
    if not on_cpu:
        warnings.warn("quantize_int8: int8 runs on CPUs only; this copy keeps fp32 layers", stacklevel=2)
    elif not (fast_int8_matmul() and torch.backends.mkldnn.enabled):
        warnings.warn(
            "quantize_int8: this CPU has no fast int8 matrix product (needs AVX512-VNNI); "
            "the copy keeps fp32 layers",
            stacklevel=2,
        )
    else:
        _replace_children(quantized)
    return quantized


def _replace_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, Attention):
            setattr(module, name, Int8Attention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            _replace_children(child)
