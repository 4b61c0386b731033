"""Opt-in int8 inference: linear layers and convolutions as int8 x int8 -> int32 products.

`quantize_int8(model)` returns a copy whose attention and MLP projections (about 70% of a ViT's time on a
CPU) run through `torch._int_mm`, which uses the CPU's VNNI int8 dot products (about 2.5x an fp32 matmul
on the machine in docs/benchmarks.md). Weights are quantized once, per output channel; activations per
row (token) at every call, both symmetric to [-127, 127]. With `convolutions=True`, on x86 CPUs, the
ResNet's convolutions that are followed by ReLU go int8 too (`Int8Conv2d`: fbgemm's dynamic int8
convolution, weights per output channel, activations per tensor at every call; the modules name them in
`int8_convs`). The ones feeding the residual sum (each block's last and its downsample) stay fp32: there,
one scale per activation tensor moved a small trained ResNet's image embeddings to mean cosine 0.994, where
the ReLU-fed ones alone keep 0.99995. Convolutions over fewer than 16 input channels (the ResNet stem's
first, a ViT's patch embedding), LayerNorms, attention itself and the final projections stay fp32. It
starts from `for_inference(model)` (QuickGELU folded into the MLPs, BatchNorms into the convolutions,
channels-last ResNet), then swaps the layers.

Inference only: the copy cannot train, and its state dict is not OpenAI's layout; save the float model.
What it costs in accuracy is measured, not assumed: see `bench/` (cosine to the fp32 outputs).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from clipforge.models.inference import for_inference
from clipforge.models.layers import Attention

__all__ = ["Int8Attention", "Int8Conv2d", "Int8Linear", "int8_convolutions_available", "quantize_int8"]

_LEVELS = 127.0  # symmetric: -127..127, so negating a value never overflows
# Convolutions over fewer input channels stay fp32: too little depth for int8 dot products to pay off.
_MIN_CONV_CHANNELS = 16


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


class Int8Conv2d(nn.Module):
    """A float convolution run as fbgemm's dynamic int8 convolution (float in, float out), CPU only.

    PyTorch's quantized-tensor operators are deprecated upstream; where they are missing,
    `int8_convolutions_available()` is False and `quantize_int8` keeps convolutions in fp32.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        weight = conv.weight.detach().float().contiguous()
        scale = weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12).double() / _LEVELS
        bias = None if conv.bias is None else conv.bias.detach().float()
        with _fbgemm(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the deprecation notice of quantized tensors
            zero = torch.zeros(weight.shape[0], dtype=torch.long)
            values = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            geometry = [list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups]
            self._packed = torch.ops.quantized.conv2d_prepack(values, bias, *geometry)
        # Without VNNI, fbgemm adds pairs of u8 x s8 products in int16, which 8-bit activations can
        # saturate: 7-bit activations then (PyTorch's default for fbgemm).
        self._reduce_range = not _cpu_has_vnni()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("int8 convolutions run on the CPU only; use the float model on other devices")
        return torch.ops.quantized.conv2d_dynamic(x.float(), self._packed, self._reduce_range).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, int8 (fbgemm)"


@functools.cache
def int8_convolutions_available() -> bool:
    """True where fbgemm's dynamic int8 convolution exists and works (x86 CPUs, PyTorch builds with it)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        conv = Int8Conv2d(nn.Conv2d(16, 4, 3))
        return conv(torch.ones(1, 16, 5, 5)).shape == (1, 4, 3, 3)
    except (AttributeError, RuntimeError):
        return False


class _fbgemm:
    """Context: PyTorch's global quantized engine set to fbgemm, restored after."""

    def __enter__(self) -> None:
        self._previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"

    def __exit__(self, *exc: object) -> None:
        torch.backends.quantized.engine = self._previous


@functools.cache
def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # unknown: take the safe setting
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(model: nn.Module, convolutions: bool = False) -> nn.Module:
    """`for_inference(model)` with every `Attention` and `nn.Linear` replaced by its int8 version, and with
    `convolutions=True` the ResNet's ReLU-fed convolutions over 16 or more input channels too (x86 CPUs;
    elsewhere they stay fp32)."""
    quantized = for_inference(model)
    _replace_children(quantized, convolutions=convolutions and int8_convolutions_available())
    return quantized


def _replace_children(module: nn.Module, convolutions: bool) -> None:
    # Modules name the convolutions that may go int8 (`int8_convs`: in a ResNet, those followed by ReLU).
    int8_convs = getattr(module, "int8_convs", ()) if convolutions else ()
    for name, child in module.named_children():
        if isinstance(child, Attention):
            setattr(module, name, Int8Attention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        elif name in int8_convs and isinstance(child, nn.Conv2d) and child.in_channels >= _MIN_CONV_CHANNELS:
            setattr(module, name, Int8Conv2d(child))
        else:
            _replace_children(child, convolutions)
