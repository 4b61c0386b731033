"""Model configurations as data: typed dataclasses plus the named architectures.

The nine paper models use OpenAI's published hyperparameters (Radford et al. 2021, Tables 19-20, and the
shapes of the released weight files). OpenCLIP's ViTs are registered as "openclip/" + OpenCLIP's name
("openclip/ViT-B-32" is OpenCLIP's GELU ViT-B-32; plain "ViT-B-32" stays OpenAI's QuickGELU model). Small
configs that train on a CPU sit beside them. A config is all
that is needed to build a model: `create_model(name_or_config)` never looks at a model's name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from clipforge.models.layers import ACTIVATIONS

VisionKind = Literal["vit", "resnet"]

# The largest sizes a config read from a file may declare: far above any CLIP released so far (ViT-bigG-14:
# width 1664, 48 layers; contexts of 77 to a few hundred tokens), so a typo or a hostile file cannot ask
# for an absurd model. Weight files are further checked tensor by tensor against the config.
MAX_WIDTH = 16_384  # embed_dim, the vision and text widths
MAX_LAYERS = 256  # blocks of a transformer, bottlenecks of a ResNet stage
MAX_IMAGE_SIZE = 4096
MAX_CONTEXT_LENGTH = 8192
MAX_VOCAB_SIZE = 1 << 20  # the tokenizer's ids stay below 0x10FFFF
MAX_MLP_RATIO = 64.0


class ConfigValueError(ValueError):
    """A model config read from a file with a missing, unknown, mistyped or out-of-range field."""


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
    def from_dict(cls, d: Any, where: str = "") -> CLIPConfig:
        """The config that `to_dict()` gave, read strictly, as from an untrusted file.

        Every field must have its exact JSON type (an integer is not a bool, a float or a string), lie
        within the bounds above and fit the others (heads divide widths, patches tile the image); unknown
        fields are refused. Raises `ConfigValueError` naming the field (prefixed by `where`).
        """
        return _parse_clip(d, where)


# ---- reading a config from a file: exact types, bounds, consistency ------------------------------------


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _object(d: Any, where: str, known: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigValueError(f"field '{where or 'model'}' must be an object, got {_show(d)}")
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ConfigValueError(
            f"unknown field '{_field(where, str(unknown[0]))}' (known: {', '.join(known)})"
        )
    missing = [k for k in required if k not in d]
    if missing:
        raise ConfigValueError(f"field '{_field(where, missing[0])}' is missing")
    return d


def _int(value: Any, name: str, low: int, high: int) -> int:
    if type(value) is not int:  # bool is a subclass of int: refused too
        raise ConfigValueError(f"field '{name}' must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise ConfigValueError(
            f"field '{name}' must be an integer from {low} to {high:,}, got {_show(value)}"
        )
    return value


def _ratio(value: Any, name: str, width: int) -> float:
    if type(value) not in (int, float):
        raise ConfigValueError(f"field '{name}' must be a number, got {_show(value)}")
    if not 0 < value <= MAX_MLP_RATIO or int(width * value) < 1:  # NaN fails the first test
        raise ConfigValueError(
            f"field '{name}' must be above 0 (at least one hidden unit) and at most {MAX_MLP_RATIO:g}, "
            f"got {_show(value)}"
        )
    return float(value)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigValueError(
            f"field '{name}' must be one of {', '.join(map(repr, choices))}, got {_show(value)}"
        )
    return value


def _heads(value: Any, name: str, channels: int, channels_name: str) -> int:
    heads = _int(value, name, 1, channels)
    if channels % heads:
        raise ConfigValueError(f"field '{name}' ({heads}) must divide {channels_name} ({channels})")
    return heads


def _parse_vision(d: Any, where: str) -> VisionConfig:
    known = tuple(f.name for f in dataclasses.fields(VisionConfig))
    d = _object(d, where, known, ("kind", "image_size", "width", "layers", "heads"))
    name = functools.partial(_field, where)
    kind = _choice(d["kind"], name("kind"), ("vit", "resnet"))
    size = _int(d["image_size"], name("image_size"), 1, MAX_IMAGE_SIZE)
    width = _int(d["width"], name("width"), 1, MAX_WIDTH)
    patch = _int(d.get("patch_size", 0), name("patch_size"), 1 if kind == "vit" else 0, size)
    ratio = _ratio(d.get("mlp_ratio", 4.0), name("mlp_ratio"), width)
    if kind == "vit":
        layers: int | tuple[int, ...] = _int(d["layers"], name("layers"), 1, MAX_LAYERS)
        heads = _heads(d["heads"], name("heads"), width, f"'{name('width')}'")
        if size % patch:
            raise ConfigValueError(
                f"field '{name('image_size')}' ({size}) must be a multiple of "
                f"'{name('patch_size')}' ({patch})"
            )
    else:
        stages = d["layers"]
        if not isinstance(stages, list | tuple) or len(stages) != 4:
            raise ConfigValueError(f"field '{name('layers')}' must be 4 stage depths, got {_show(stages)}")
        layers = tuple(_int(n, f"{name('layers')}[{i}]", 1, MAX_LAYERS) for i, n in enumerate(stages))
        heads = _heads(d["heads"], name("heads"), width * 32, f"32 x '{name('width')}'")
        if size % 32:
            raise ConfigValueError(
                f"field '{name('image_size')}' must be a multiple of 32 for a ResNet, got {size}"
            )
    return VisionConfig(kind, size, width, layers, heads, patch, ratio)  # type: ignore[arg-type]


def _parse_text(d: Any, where: str) -> TextConfig:
    known = tuple(f.name for f in dataclasses.fields(TextConfig))
    d = _object(d, where, known, ())
    name = functools.partial(_field, where)
    default = TextConfig()
    width = _int(d.get("width", default.width), name("width"), 1, MAX_WIDTH)
    return TextConfig(
        context_length=_int(
            d.get("context_length", default.context_length), name("context_length"), 2, MAX_CONTEXT_LENGTH
        ),
        vocab_size=_int(d.get("vocab_size", default.vocab_size), name("vocab_size"), 2, MAX_VOCAB_SIZE),
        width=width,
        heads=_heads(d.get("heads", default.heads), name("heads"), width, f"'{name('width')}'"),
        layers=_int(d.get("layers", default.layers), name("layers"), 1, MAX_LAYERS),
        mlp_ratio=_ratio(d.get("mlp_ratio", default.mlp_ratio), name("mlp_ratio"), width),
    )


def _parse_clip(d: Any, where: str) -> CLIPConfig:
    known = tuple(f.name for f in dataclasses.fields(CLIPConfig))
    d = _object(d, where, known, ("embed_dim", "vision"))
    bias = d.get("logit_bias", False)
    if not isinstance(bias, bool):
        raise ConfigValueError(
            f"field '{_field(where, 'logit_bias')}' must be true or false, got {_show(bias)}"
        )
    return CLIPConfig(
        embed_dim=_int(d["embed_dim"], _field(where, "embed_dim"), 1, MAX_WIDTH),
        vision=_parse_vision(d["vision"], _field(where, "vision")),
        text=_parse_text(d.get("text", {}), _field(where, "text")),
        activation=_choice(
            d.get("activation", "quick_gelu"), _field(where, "activation"), tuple(ACTIVATIONS)
        ),
        logit_bias=bias,
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


def _openclip_vit(
    embed_dim: int,
    width: int,
    layers: int,
    patch: int,
    text: TextConfig,
    head_width: int = 64,
    mlp_ratio: float = 4.0,
    quick_gelu: bool = False,
) -> CLIPConfig:
    # OpenCLIP's vision configs give a head width rather than a head count (64 unless stated).
    vision = VisionConfig("vit", 224, width, layers, width // head_width, patch, mlp_ratio)
    return CLIPConfig(embed_dim, vision, text, activation="quick_gelu" if quick_gelu else "gelu")


def _openclip_configs() -> dict[str, CLIPConfig]:
    """OpenCLIP's ViT architectures, named "openclip/" + OpenCLIP's own name. The shapes are OpenCLIP's
    published model configs (github.com/mlfoundations/open_clip, src/open_clip/model_configs/*.json).
    OpenCLIP's plain names use exact GELU; its "-quickgelu" names are the same shapes with QuickGELU."""
    text_b, text_l = _text(512), TextConfig(width=768, heads=12, layers=12)
    text_h = TextConfig(width=1024, heads=16, layers=24)
    shapes = {
        "ViT-B-32": dict(embed_dim=512, width=768, layers=12, patch=32, text=text_b),
        "ViT-B-16": dict(embed_dim=512, width=768, layers=12, patch=16, text=text_b),
        "ViT-L-14": dict(embed_dim=768, width=1024, layers=24, patch=14, text=text_l),
        "ViT-H-14": dict(embed_dim=1024, width=1280, layers=32, patch=14, text=text_h, head_width=80),
        "ViT-g-14": dict(
            embed_dim=1024, width=1408, layers=40, patch=14, text=text_h, head_width=88, mlp_ratio=4.3637
        ),
        "ViT-bigG-14": dict(
            embed_dim=1280, width=1664, layers=48, patch=14, head_width=104, mlp_ratio=4.9231,
            text=TextConfig(width=1280, heads=20, layers=32),
        ),
    }  # fmt: skip
    configs: dict[str, CLIPConfig] = {}
    for name, shape in shapes.items():
        configs[f"openclip/{name}"] = _openclip_vit(**shape)  # type: ignore[arg-type]
        if name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14"):  # OpenCLIP's -quickgelu variants
            configs[f"openclip/{name}-quickgelu"] = _openclip_vit(**shape, quick_gelu=True)  # type: ignore[arg-type]
    return configs


MODEL_CONFIGS.update(_openclip_configs())

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
