"""Opt-in int8 inference (models/int8.py): one exact arithmetic, close to fp32, fp32 where int8 is slow."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipforge.models import create_model, for_inference, get_config, int8
from clipforge.models.int8 import Int8Attention, Int8Linear, quantize_int8
from clipforge.models.layers import QuickGELU
from conftest import randomized_model


def _emulate(layer: Int8Linear, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The documented arithmetic, written out: symmetric per-row int8 grids, an exact sum of products (int8
    values as float64: every partial sum is an integer below 2^53), the sum rounded once to fp32, times the
    two fp32 scales, plus the fp32 bias."""

    def grid(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        peak = v.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        return (v * (127.0 / peak)).round(), peak / 127.0

    x_values, x_scale = grid(x.reshape(-1, x.shape[-1]))
    w_values, w_scale = grid(weight)
    assert x_values.abs().max() <= 127 and w_values.abs().max() <= 127
    exact = x_values.double() @ w_values.double().t()
    y = exact.float().mul_(x_scale).mul_(w_scale.t()) + bias
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("features", [40, 3072])
def test_int8_linear_is_the_documented_arithmetic_exactly(features: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, features, generator=g), torch.randn(24, generator=g)
    x = torch.randn(2, 5, features, generator=g) * 3
    # A row and a channel of extreme values (127 and -127): a kernel that offsets activations to uint8 and
    # adds pairs of products in int16 (AVX2 without VNNI) saturates on them, 2 * 255 * 127 > 2^15; at 3072
    # features their sum passes 2^24, so its conversion to fp32 rounds. 7-bit grids, per-tensor scales or
    # bf16 products differ on the random rows.
    x[0, 0], weight[0] = 0.5, -2.0
    layer = Int8Linear(weight, bias)
    assert torch.equal(layer(x), _emulate(layer, weight, bias, x))


def test_int8_linear_error_is_within_the_bound_of_8_bit_grids() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(4, 7, 256)
    y, y8 = linear(x), Int8Linear.from_linear(linear)(x)
    assert y8.shape == y.shape and y8.dtype == torch.float32
    # Rounding to a grid of step max|row| / 127 moves each value by at most half a step: |e_x| <= max|x| / 254
    # per element, and |e_w| likewise per weight row. Then for each output
    # |x.w - x8.w8| <= |e_x.w| + |x.e_w| + |e_x.e_w| <= ||e_x|| ||w|| + ||x|| ||e_w|| + ||e_x|| ||e_w||
    # (Cauchy-Schwarz), with ||e|| <= sqrt(256) * half-step. 1e-4 of the output's scale covers fp32 rounding.
    w = linear.weight.detach()
    ex = x.abs().amax(-1, keepdim=True) / 254 * 16  # ||e_x|| bound, per row
    ew = w.abs().amax(-1) / 254 * 16  # ||e_w|| bound, per output channel
    bound = ex * w.norm(dim=-1) + x.norm(dim=-1, keepdim=True) * ew + ex * ew
    assert ((y8 - y).abs() <= bound * 1.0001 + 1e-4 * y.abs().amax()).all()


@pytest.fixture
def int8_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 copy is tested on every CPU: `_int_mm` is exact everywhere, only slow without VNNI."""
    monkeypatch.setattr(int8, "fast_int8_matmul", lambda: True)


@pytest.mark.usefixtures("int8_is_fast")
@pytest.mark.parametrize("name", ["ViT-Micro-16-32", "RN-Tiny-64"])
def test_quantized_model_encodes_close_to_fp32(name: str) -> None:
    model = randomized_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_int8(model)
    size = model.config.vision.image_size
    images = torch.randn(3, 3, size, size)
    tokens = torch.randint(1, 1000, (3, model.config.text.context_length))
    with torch.no_grad():
        for encode, inputs in (("encode_image", images), ("encode_text", tokens)):
            ours, fp32 = getattr(quantized, encode)(inputs), getattr(model, encode)(inputs)
            assert F.cosine_similarity(ours, fp32, dim=-1).min() > 0.999, encode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert any(isinstance(m, Int8Attention) for m in quantized.modules())
    assert not any(p.requires_grad for p in quantized.parameters()) and not quantized.training


@pytest.mark.usefixtures("int8_is_fast")
def test_convolutions_stay_fp32_and_asking_for_int8_ones_warns() -> None:
    model = randomized_model("RN-Tiny-64")
    with pytest.warns(UserWarning, match="convolutions=True has no effect"):
        quantized = quantize_int8(model, convolutions=True)
    pooled = [_attnpool_input(m) for m in (quantized, for_inference(model))]
    assert torch.equal(*pooled)  # everything before the attention pool is the fp32 inference copy's
    convs = [m for m in quantized.visual.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.visual.modules())


def _attnpool_input(model: nn.Module) -> torch.Tensor:
    seen = []
    hook = model.visual.attnpool.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model.encode_image(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    hook.remove()
    return seen[0]


def test_without_a_fast_int8_kernel_the_copy_stays_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "fast_int8_matmul", lambda: False)
    model = randomized_model("ViT-Micro-16-32")
    with pytest.warns(UserWarning, match="no fast int8") as caught:
        quantized = quantize_int8(model)
    ours = [str(w.message) for w in caught if "quantize_int8" in str(w.message)]
    assert len(ours) == 1 and "\n" not in ours[0]  # one warning, one line
    assert not any(isinstance(m, (Int8Linear, Int8Attention)) for m in quantized.modules())
    tokens = torch.randint(1, 1000, (2, model.config.text.context_length))
    with torch.no_grad():
        assert torch.equal(quantized.encode_text(tokens), for_inference(model).encode_text(tokens))


def test_with_a_fast_int8_kernel_nothing_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "fast_int8_matmul", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantize_int8(create_model(get_config("ViT-Micro-16-32")).eval())
    assert not [w for w in caught if "quantize_int8" in str(w.message)]
    assert any(isinstance(m, Int8Linear) for m in quantized.modules())


def test_quick_gelu_is_x_sigmoid_1702x() -> None:
    x = torch.linspace(-20, 20, 10001, dtype=torch.float64)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x), rtol=0, atol=1e-14)
