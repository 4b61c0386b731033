"""Model configurations as data: typed dataclasses plus the named architectures.

The nine paper models use OpenAI's published hyperparameters (Radford et al. 2021, Tables 19-20, and the
shapes of the released weight files). Small configs that train on a CPU sit beside them. A config is all
that is needed to build a model: `create_model(name_or_config)` never looks at a model's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

VisionKind = Literal["vit", "resnet"]


@dataclass(frozen=True)
class VisionConfig:
    kind: VisionKind  # "vit": VisionTransformer; "resnet": ModifiedResNet with attention pooling
    image_size: int  # input resolution in pixels (square)
    width: int  # ViT: token width; ResNet: stem width (stage widths are 1x, 2x, 4x, 8x of it, times 4)
    layers: int | tuple[int, ...]  # ViT: number of blocks; ResNet: bottlenecks per stage (4 stages)
    heads: int  # attention heads (ViT blocks, or the ResNet's attention pool)
    patch_size: int = 0  # ViT only: square patch side in pixels
    mlp_ratio: float = 4.0  # hidden width of each MLP as a multiple of the token width

    def __post_init__(self) -> None:
        if self.kind == "vit":
            if self.patch_size <= 0 or self.image_size % self.patch_size:
                raise ValueError(
                    f"ViT image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
                )
        elif self.kind == "resnet":
            if not isinstance(self.layers, tuple) or len(self.layers) != 4:
                raise ValueError(f"ResNet layers must be 4 stage depths, got {self.layers!r}")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size {self.image_size} must be a multiple of 32")
        else:
            raise ValueError(f"unknown vision kind {self.kind!r}; expected 'vit' or 'resnet'")


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77  # tokens per text, SOT and EOT included
    vocab_size: int = 49408  # BPE vocabulary incl. the two special tokens
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int  # size of the joint image-text embedding space
    vision: VisionConfig
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "quick_gelu"  # the released models use QuickGELU; "gelu" for exact GELU
    # A learned scalar added to the logits, for SigLIP's sigmoid loss (state-dict key "logit_bias", as in
    # OpenCLIP). Off: the model has exactly the keys of OpenAI's weight files.
    logit_bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        vision = dict(d["vision"])
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        return cls(
            embed_dim=d["embed_dim"],
            vision=VisionConfig(**vision),
            text=TextConfig(**d.get("text", {})),
            activation=d.get("activation", "quick_gelu"),
            logit_bias=bool(d.get("logit_bias", False)),
        )


def _vit(
    embed_dim: int, image_size: int, width: int, layers: int, patch: int, text: TextConfig
) -> CLIPConfig:
    # OpenAI's ViTs use 64-wide heads.
    vision = VisionConfig("vit", image_size, width, layers, heads=width // 64, patch_size=patch)
    return CLIPConfig(embed_dim, vision, text)


def _resnet(
    embed_dim: int, image_size: int, width: int, layers: tuple[int, ...], text: TextConfig
) -> CLIPConfig:
    # The attention pool runs on width*32 channels with 64-wide heads.
    vision = VisionConfig("resnet", image_size, width, layers, heads=width * 32 // 64)
    return CLIPConfig(embed_dim, vision, text)


def _text(width: int, layers: int = 12) -> TextConfig:
    return TextConfig(width=width, heads=width // 64, layers=layers)


MODEL_CONFIGS: dict[str, CLIPConfig] = {
    # The paper's models, with OpenAI's release names (ViT-B/32 is spelled ViT-B-32).
    "RN50": _resnet(1024, 224, 64, (3, 4, 6, 3), _text(512)),
    "RN101": _resnet(512, 224, 64, (3, 4, 23, 3), _text(512)),
    "RN50x4": _resnet(640, 288, 80, (4, 6, 10, 6), _text(640)),
    "RN50x16": _resnet(768, 384, 96, (6, 8, 18, 8), _text(768)),
    "RN50x64": _resnet(1024, 448, 128, (3, 15, 36, 10), _text(1024)),
    "ViT-B-32": _vit(512, 224, 768, 12, 32, _text(512)),
    "ViT-B-16": _vit(512, 224, 768, 12, 16, _text(512)),
    "ViT-L-14": _vit(768, 224, 1024, 24, 14, _text(768)),
    "ViT-L-14-336": _vit(768, 336, 1024, 24, 14, _text(768)),
    # Small models that train on a CPU in minutes (64-pixel images, short contexts are allowed at
    # tokenization time; the context length here stays 77 so OpenAI's tokenizer output fits as is).
    "ViT-Tiny-8-64": CLIPConfig(
        256, VisionConfig("vit", 64, 256, 6, heads=4, patch_size=8), TextConfig(width=256, heads=4, layers=6)
    ),
    "ViT-Mini-8-64": CLIPConfig(
        192, VisionConfig("vit", 64, 192, 4, heads=3, patch_size=8), TextConfig(width=192, heads=3, layers=4)
    ),
    "ViT-Nano-8-64": CLIPConfig(
        128, VisionConfig("vit", 64, 128, 2, heads=2, patch_size=8), TextConfig(width=128, heads=2, layers=2)
    ),
    "ViT-Nano-16-64": CLIPConfig(
        128, VisionConfig("vit", 64, 128, 2, heads=2, patch_size=16), TextConfig(width=128, heads=2, layers=2)
    ),
    # Smoke-test size: builds and steps in milliseconds (tests, CI).
    "ViT-Micro-16-32": CLIPConfig(
        64, VisionConfig("vit", 32, 64, 1, heads=1, patch_size=16), TextConfig(width=64, heads=1, layers=1)
    ),
    "RN-Tiny-64": CLIPConfig(
        256, VisionConfig("resnet", 64, 16, (1, 1, 1, 1), heads=8), TextConfig(width=256, heads=4, layers=6)
    ),
}

# The nine architectures of the paper, with released weights.
PAPER_MODELS: tuple[str, ...] = (
    "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336",
)  # fmt: skip

# OpenAI's release names use a slash ("ViT-B/32"); accept both spellings.
ALIASES = {
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}


def available_models() -> list[str]:
    """Names accepted by `create_model` and `load`."""
    return list(MODEL_CONFIGS)


def get_config(name: str) -> CLIPConfig:
    key = ALIASES.get(name, name)
    if key not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[key]
