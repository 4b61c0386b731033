"""The paper's ModifiedResNet image tower (Radford et al. 2021, §2.4).

Changes from a ResNet-50: a 3-convolution stem with an average pool instead of a max pool; strided
bottlenecks downsample with an average pool before the last 1x1 convolution (anti-aliased, after Zhang
2019); and global average pooling is replaced by attention pooling, where the query is the mean token.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.config import VisionConfig


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(c_out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(inplanes, planes, 1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = _conv_bn(planes, planes * self.expansion, 1)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            conv, bn = _conv_bn(inplanes, planes * self.expansion, 1)
            pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            # Keys "downsample.0" / "downsample.1" as in the weight files; the pool has no parameters.
            self.downsample = nn.Sequential(OrderedDict([("-1", pool), ("0", conv), ("1", bn)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """One multi-head attention layer whose single query is the mean of the spatial tokens."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(spatial_dim**2 + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+HW, C)
        x = x + self.positional_embedding.to(x.dtype)
        B, T, C = x.shape
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, -1).transpose(1, 2)  # (B, H, 1, D)
        k = self.k_proj(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, C))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, activation: str = "relu"):
        super().__init__()
        # `activation` configures the transformers; a ResNet always uses ReLU, as released.
        width = cfg.width
        self.image_size = cfg.image_size
        self.conv1, self.bn1 = _conv_bn(3, width // 2, 3, stride=2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(width // 2, width // 2, 3)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = _conv_bn(width // 2, width, 3)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.attnpool.positional_embedding, std=self.attnpool.k_proj.in_features**-0.5)
        # Zero the last BN gain of every residual branch: each block starts as the identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)
