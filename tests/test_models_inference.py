"""Inference copies (models/inference.py): the same function as the model, rearranged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clipforge.models import create_model, for_inference, get_config
from clipforge.models.inference import fold_batchnorm, fold_quick_gelu
from clipforge.models.layers import QuickGELU
from conftest import randomized_model
from tolerances import rounding_budget, rounding_tolerance


def _inputs(model: nn.Module, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.vision.image_size
    return torch.randn(n, 3, size, size), torch.randint(1, 1000, (n, model.config.text.context_length))


@pytest.mark.parametrize("name", ["RN-Tiny-64", "ViT-Micro-16-32"])
def test_inference_copy_computes_the_same_function(name: str) -> None:
    model = randomized_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = for_inference(model)
    images, tokens = _inputs(model)
    with torch.no_grad():
        for encode, inputs in (("encode_image", images), ("encode_text", tokens)):
            ours, reference = getattr(fast, encode)(inputs), getattr(model, encode)(inputs)
            # Folded weights and other kernels: the same function up to rounding (tolerances.rounding_rtol).
            budget = rounding_budget(model.config, "image" if encode == "encode_image" else "text")
            torch.testing.assert_close(ours, reference, rtol=0, atol=rounding_tolerance(reference, *budget))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert not any(isinstance(m, (nn.BatchNorm2d, QuickGELU)) for m in fast.modules())


def test_resnet_copy_runs_channels_last() -> None:
    fast = for_inference(randomized_model("RN-Tiny-64"))
    convs = [m for m in fast.visual.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(c.bias is not None for c in convs)  # each carries its folded BatchNorm
    stem = fast.visual.conv1(torch.randn(1, 3, 64, 64))  # a contiguous input gives a channels-last output
    assert stem.is_contiguous(memory_format=torch.channels_last)


def test_batchnorm_folding_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(create_model(get_config("RN-Tiny-64")).train())


def test_folding_quick_gelu_keeps_the_function() -> None:
    model = randomized_model("ViT-Micro-16-32")
    folded = fold_quick_gelu(copy.deepcopy(model))
    assert not any(isinstance(m, QuickGELU) for m in folded.modules())
    images, tokens = _inputs(model)
    with torch.no_grad():
        for tower, encode, inputs in (("image", "encode_image", images), ("text", "encode_text", tokens)):
            reference = getattr(model, encode)(inputs)
            atol = rounding_tolerance(reference, *rounding_budget(model.config, tower))
            torch.testing.assert_close(getattr(folded, encode)(inputs), reference, rtol=0, atol=atol)
