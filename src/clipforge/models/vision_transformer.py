"""The ViT image tower: patches -> tokens, a class token, pre-LN transformer, class token -> embedding.

Optional patch dropout (training only, off by default) thins the patch tokens after the positional
embedding is added; see `patch_dropout.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.models.config import VisionConfig
from clipforge.models.layers import LayerNorm, Transformer
from clipforge.models.patch_dropout import PatchDropout


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, activation: str):
        super().__init__()
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.image_size = cfg.image_size
        # A strided convolution is a linear map of each non-overlapping patch (bias-free, as released).
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.patch_dropout = PatchDropout(0.0)  # off unless a training run sets it (no parameters)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, int(cfg.layers), cfg.heads, cfg.mlp_ratio, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        scale = self.conv1.out_channels**-0.5
        for p in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(p, std=scale)
        self.conv1.reset_parameters()
        self.transformer.init_default()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+g*g, C)
        x = self.patch_dropout(x)  # (B, 1+kept, C); the identity in eval mode
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, output_dim)
