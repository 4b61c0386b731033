"""AdamW with decoupled weight decay on weights only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Layers whose parameters are gains and biases of a normalization, never decayed.
NORM_LAYERS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)

# The paper's Adam settings (Radford et al. 2021, Tables 18-20), by image tower.
PAPER_ADAM = {"vit": (0.9, 0.98, 1e-6), "resnet": (0.9, 0.999, 1e-8)}


def parameter_role(module: nn.Module, param: nn.Parameter) -> str:
    """What a parameter does: "gain" or "bias" of a normalization, "bias" (a vector added to an output, or
    SigLIP's scalar `logit_bias` added to the logits), "temperature" (the scalar logit_scale), or
    "weight" (a matrix or kernel that mixes features, embeddings and projections included)."""
    if isinstance(module, NORM_LAYERS):
        return "gain" if param is module.weight else "bias"
    if param is getattr(module, "logit_bias", None):
        return "bias"
    if param.ndim == 0:
        return "temperature"
    if param.ndim == 1:
        return "bias"
    return "weight"


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weights decayed by `weight_decay`; gains, biases and the temperature not."""
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            (decay if parameter_role(module, param) == "weight" else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.AdamW:
    # The fused kernel (CPU and CUDA) updates all parameters in one pass: ~3x faster than foreach here.
    groups = weight_decay_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup to `peak_lr` over `warmup_steps`, then cosine decay to `final_lr` at `total_steps`.

    Stateless: the rate is a function of the step alone, so resuming needs nothing but the step.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    final_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.final_lr + 0.5 * (self.peak_lr - self.final_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
