"""The architectures benchmarked, as plain data every library can be built from, and their inputs.

Each library builds the same network from an `Arch` with its own code (see `bench.libraries`); the parameter
counts they report are compared by the suite, so a mismatch shows. Sizes are OpenAI's (Radford et al. 2021)
and, for `ViT-Mini-8-64`, the pictext recipe's (configs/pictext-tiny.toml: context 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOT, EOT = 49406, 49407  # OpenAI's start/end-of-text ids: EOT has the largest id, where CLIP reads a text


@dataclass(frozen=True)
class Arch:
    name: str  # clipforge's registered name (the text context may differ: see `context`)
    embed_dim: int
    image_size: int
    vision: str  # "vit" or "resnet"
    vision_width: int  # ViT: token width; ResNet: stem width
    vision_layers: int | tuple[int, ...]
    patch_size: int  # ViT only (0 for a ResNet)
    text_width: int
    text_layers: int
    text_heads: int
    context: int = 77
    vocab: int = 49408

    @property
    def vision_heads(self) -> int:
        # OpenAI's rule: 64-wide heads; a ResNet's attention pool runs on width * 32 channels.
        return self.vision_width * 32 // 64 if self.vision == "resnet" else self.vision_width // 64


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("ViT-B-32", 512, 224, "vit", 768, 12, 32, 512, 12, 8),
        Arch("ViT-B-16", 512, 224, "vit", 768, 12, 16, 512, 12, 8),
        Arch("ViT-L-14", 768, 224, "vit", 1024, 24, 14, 768, 12, 12),
        Arch("RN50", 1024, 224, "resnet", 64, (3, 4, 6, 3), 0, 512, 12, 8),
        Arch("ViT-Mini-8-64", 192, 64, "vit", 192, 4, 8, 192, 4, 3, context=32),
    )
}


def make_images(arch: Arch, batch: int, device: str) -> torch.Tensor:
    """(B, 3, S, S) normalized-looking pixels; the same for every library (seeded)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, arch.image_size, arch.image_size, generator=g).to(device)


def make_tokens(arch: Arch, batch: int, device: str) -> torch.Tensor:
    """(B, context) ids of full-length texts: SOT, random ids, EOT last (no padding: all tokens are used)."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, SOT, (batch, arch.context), generator=g)
    tokens[:, 0], tokens[:, -1] = SOT, EOT
    return tokens.to(device)
