"""Opt-in int8 inference: the transformer's linear layers as int8 x int8 -> int32 matrix products.

`quantize_int8(model)` returns a copy whose attention and MLP projections (about 70% of a ViT's time on a
CPU) run through `torch._int_mm`, which uses the CPU's VNNI int8 dot products (about 2.5x an fp32 matmul
on the machine in docs/benchmarks.md). Weights are quantized once, per output channel; activations per
row (token) at every call, both symmetric to [-127, 127]. Convolutions (the ResNet tower, patch
embeddings), LayerNorms, attention itself and the final projections stay fp32. It starts from
`for_inference(model)` (QuickGELU folded into the MLPs, BatchNorms into the convolutions, channels-last
ResNet), then swaps the layers.

Inference only: the copy cannot train, and its state dict is not OpenAI's layout; save the float model.
What it costs in accuracy is measured, not assumed: see `bench/` (cosine to the fp32 outputs).
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.models.inference import for_inference
from clipforge.models.layers import Attention

__all__ = ["Int8Attention", "Int8Linear", "quantize_int8"]

_LEVELS = 127.0  # symmetric: -127..127, so negating a value never overflows


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and fp32 scales (one per row of the last dimension) with x ~= values * scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / _LEVELS
    return torch.round(x / scale).clamp_(-_LEVELS, _LEVELS).to(torch.int8), scale


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
        y = torch._int_mm(values, self.weight_int8).float() * scale * self.weight_scale
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


def quantize_int8(model: nn.Module) -> nn.Module:
    """`for_inference(model)` with every `Attention` and `nn.Linear` replaced by its int8 version."""
    quantized = for_inference(model)
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
