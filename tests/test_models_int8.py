"""Opt-in int8 inference (models/int8.py): exact where int8 is exact, close to fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipforge.models import create_model, get_config, int8
from clipforge.models.int8 import (
    Int8Attention,
    Int8Conv2d,
    Int8Linear,
    int8_convolutions_available,
    quantize_int8,
)
from clipforge.models.layers import QuickGELU
from clipforge.models.modified_resnet import Bottleneck


def test_int8_linear_is_exact_on_values_int8_represents() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (24, 40), generator=g).float()
    weight[:, 0] = 127  # every row's max is 127: its scale is exactly 1
    x = torch.randint(-127, 128, (2, 5, 40), generator=g).float()
    x[..., 0] = -127
    bias = torch.randn(24, generator=g)
    layer = Int8Linear(weight, bias)
    assert torch.equal(layer(x), F.linear(x.double(), weight.double(), bias.double()).float())


def test_int8_linear_is_close_to_fp32_on_random_values() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(4, 7, 256)
    y, y8 = linear(x), Int8Linear.from_linear(linear)(x)
    assert y8.shape == y.shape and y8.dtype == torch.float32
    assert (y8 - y).norm() / y.norm() < 0.01


@pytest.mark.parametrize(
    "name,convolutions", [("ViT-Micro-16-32", False), ("RN-Tiny-64", False), ("RN-Tiny-64", True)]
)
def test_quantized_model_encodes_close_to_fp32(name: str, convolutions: bool) -> None:
    torch.manual_seed(0)
    model = create_model(get_config(name)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model, convolutions=convolutions)
    size = model.config.vision.image_size
    images = torch.randn(3, 3, size, size)
    tokens = torch.randint(1, 1000, (3, model.config.text.context_length))
    with torch.no_grad():
        for encode, inputs in (("encode_image", images), ("encode_text", tokens)):
            ours, fp32 = getattr(quantized, encode)(inputs), getattr(model, encode)(inputs)
            assert F.cosine_similarity(ours, fp32, dim=-1).min() > 0.99, encode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    linears = [m for m in quantized.modules() if isinstance(m, nn.Linear)]
    assert not linears and any(isinstance(m, Int8Attention) for m in quantized.modules())
    assert not any(p.requires_grad for p in quantized.parameters()) and not quantized.training


needs_int8_convs = pytest.mark.skipif(
    not int8_convolutions_available(),
    reason="fbgemm's int8 convolution is not in this PyTorch build (x86 only)",
)


@needs_int8_convs
@pytest.mark.parametrize(
    "geometry",
    [dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=3, stride=2, bias=False)],
)
def test_int8_conv_is_close_to_fp32(geometry: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, **geometry)
    x = torch.randn(2, 32, 15, 15)
    y = conv(x)
    for layout in (torch.contiguous_format, torch.channels_last):
        y8 = Int8Conv2d(conv)(x.contiguous(memory_format=layout))
        assert y8.shape == y.shape and y8.dtype == torch.float32
        assert (y8 - y).norm() / y.norm() < 0.02, layout


@needs_int8_convs
def test_resnet_convolutions_followed_by_relu_go_int8() -> None:
    torch.manual_seed(0)
    model = create_model(get_config("RN-Tiny-64")).eval()
    assert not any(isinstance(m, Int8Conv2d) for m in quantize_int8(model).modules())  # opt-in
    quantized = quantize_int8(model, convolutions=True)
    for block in quantized.visual.modules():
        if isinstance(block, Bottleneck):
            for conv in (block.conv1, block.conv2):  # followed by ReLU: int8 where deep enough
                assert isinstance(conv, Int8Conv2d) == (conv.in_channels >= 16)
            assert isinstance(block.conv3, nn.Conv2d)  # feeds the residual sum: fp32
            assert block.downsample is None or isinstance(block.downsample[1], nn.Conv2d)
    assert sum(isinstance(m, Int8Conv2d) for m in quantized.visual.modules()) >= 6


def test_without_int8_convolutions_they_stay_float(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "int8_convolutions_available", lambda: False)
    quantized = quantize_int8(create_model(get_config("RN-Tiny-64")).eval(), convolutions=True)
    assert not any(isinstance(m, Int8Conv2d) for m in quantized.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in quantized.visual.modules()) > 10


def test_quick_gelu_is_x_sigmoid_1702x() -> None:
    x = torch.linspace(-20, 20, 10001, dtype=torch.float64)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x), rtol=0, atol=1e-14)
