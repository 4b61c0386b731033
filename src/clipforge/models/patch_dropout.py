"""Patch dropout: train a ViT on a random subset of its patch tokens (Liu et al. 2022, "PatchDropout";
Li et al. 2023, FLIP).

Attention does not care how many tokens there are, so dropping half the patches roughly halves the image
tower's cost per sample while each image still contributes; FLIP trains CLIP this way and evaluates on
all patches. The class token, which the tower reads its output from, is always kept.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDropout(nn.Module):
    """Drop a fraction `prob` of the patch tokens of each image, in training mode only.

    Input and output are (B, 1 + N, C) with the class token first; N becomes `kept(N)`. Each image keeps
    its own random subset, drawn from torch's generator on the input's device (so a seed fixes it, and a
    training checkpoint's saved RNG state resumes it exactly). No parameters: the state dict is unchanged.
    """

    def __init__(self, prob: float = 0.0):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout must be in [0, 1), got {prob}")
        self.prob = prob

    def kept(self, num_patches: int) -> int:
        """How many of `num_patches` patch tokens survive (at least one, as in OpenCLIP)."""
        return max(1, int(num_patches * (1 - self.prob)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        batch, num_patches, width = patches.shape
        # The top-k of uniform noise is a uniformly random subset. Order does not matter: the positional
        # embedding is already added and the ViT's attention is unmasked.
        scores = torch.rand(batch, num_patches, device=x.device)
        keep = scores.topk(self.kept(num_patches), dim=1).indices  # (B, kept)
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([cls, patches], dim=1)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"
