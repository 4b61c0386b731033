"""Inference copies: the same function, rearranged to run faster, for evaluation, embedding and serving.

`for_inference(model)` returns an eval-mode copy of a CLIP model (or of one tower) with

* every BatchNorm folded into the convolution before it (`torch.nn.utils.fusion.fuse_conv_bn_eval`): in
  eval mode a BatchNorm is a per-channel affine map, so it can live in the convolution's weights and bias,
  and the ResNet tower's 50-odd normalization passes over its feature maps disappear;
* the ResNet tower's weights in channels-last memory format, oneDNN's native layout on CPUs: each
  convolution then reads and writes NHWC directly instead of reordering its input and output;
* QuickGELU's 1.702 folded into the MLP layers around it (`fold_quick_gelu`): one SiLU pass instead of three.

Outputs equal the original model's up to float rounding (tests check 1e-5). The copy is for inference: it
cannot train, and its state dict is not OpenAI's layout -- save the original model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from clipforge.models.layers import MLP, QUICK_GELU_SCALE, QuickGELU
from clipforge.models.modified_resnet import ModifiedResNet

__all__ = ["fold_batchnorm", "fold_quick_gelu", "for_inference"]


def for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode, gradient-free copy of ``model`` with the rearrangements above."""
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    fold_quick_gelu(fast)
    fold_batchnorm(fast)
    for tower in fast.modules():
        if isinstance(tower, ModifiedResNet):
            # The input follows: a convolution with channels-last weights writes a channels-last output.
            tower.to(memory_format=torch.channels_last)
    return fast


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """In place, eval mode only: each ``convN`` -> ``bnN`` pair (and a downsample's ``0`` -> ``1``) becomes
    one convolution with a bias, the BatchNorm an identity."""
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: training BatchNorms use batch statistics")
    for module in model.modules():
        for conv_name, conv in list(module.named_children()):
            bn_name = _batchnorm_after(conv_name)
            bn = getattr(module, bn_name, None) if bn_name else None
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return model


def _batchnorm_after(conv_name: str) -> str | None:
    """The name of the BatchNorm that normalizes ``conv_name``'s output, by the ResNet's naming."""
    if conv_name.startswith("conv"):
        return "bn" + conv_name.removeprefix("conv")
    if conv_name == "0":  # downsample = Sequential(pool "-1", conv "0", bn "1")
        return "1"
    return None


@torch.no_grad()
def fold_quick_gelu(model: nn.Module) -> nn.Module:
    """In place, for inference: each MLP's x * sigmoid(1.702 x) becomes one SiLU pass.

    c_proj(qg(c_fc(x))) with qg(h) = silu(1.702 h) / 1.702 equals c_proj'(silu(c_fc'(x))) where c_fc' is
    c_fc scaled by 1.702 (weight and bias) and c_proj' has its weight divided by 1.702: the same function,
    one elementwise pass over the MLP's hidden activations instead of three.
    """
    for mlp in model.modules():
        if isinstance(mlp, MLP) and isinstance(mlp.gelu, QuickGELU):
            mlp.c_fc.weight.mul_(QUICK_GELU_SCALE)
            mlp.c_fc.bias.mul_(QUICK_GELU_SCALE)
            mlp.c_proj.weight.div_(QUICK_GELU_SCALE)
            mlp.gelu = nn.SiLU()
    return model
