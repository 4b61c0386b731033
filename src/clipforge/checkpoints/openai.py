"""OpenAI's release files: tensors out of a TorchScript object tree, and the architecture from their shapes.

The released `.pt` files are TorchScript archives of OpenAI's `CLIP` module. `script_tensors` walks the
module tree that `safe_unpickle.read_archive` returns and names each tensor attribute by its dotted path,
which gives exactly the keys of the module's `state_dict()`. `infer_config` reads the architecture from
those shapes, as OpenAI's `build_model` does (github.com/openai/CLIP, clip/model.py): a ViT has
`visual.proj`; depths come from enumerating block indices; heads are width // 64 (ViT and text) and
width * 32 // 64 (the ResNet's attention pool), OpenAI's rule for all released models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from clipforge.checkpoints.safe_unpickle import CheckpointError, ScriptObject
from clipforge.models.config import MODEL_CONFIGS, CLIPConfig, TextConfig, VisionConfig

# Scalars OpenAI's archives carry beside the weights; the config holds them, so they are not loaded.
KNOWN_EXTRAS = ("input_resolution", "context_length", "vocab_size")

StateDict = dict[str, torch.Tensor]


def script_tensors(root: ScriptObject) -> StateDict:
    """Every tensor attribute in a TorchScript object tree, by dotted name (`visual.conv1.weight`)."""
    found: StateDict = {}
    seen: set[int] = set()

    def walk(obj: ScriptObject, prefix: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, value in obj.attributes.items():
            if isinstance(value, torch.Tensor):
                found[prefix + name] = value
            elif isinstance(value, ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return found


def _get(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"cannot infer the architecture: the weights have no {key!r}")
    if sd[key].ndim != ndim:
        shape = tuple(sd[key].shape)
        raise CheckpointError(f"cannot infer the architecture: {key} has shape {shape}, not {ndim}-D")
    return sd[key]


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered sub-modules `<prefix><i>.` there are (indices must run 0..n-1)."""
    indices = {key[len(prefix) :].split(".", 1)[0] for key in sd if key.startswith(prefix)}
    n = len(indices)
    if n == 0 or indices != {str(i) for i in range(n)}:
        raise CheckpointError(f"cannot infer the architecture: blocks under {prefix!r} are {sorted(indices)}")
    return n


def _grid(tokens: int, key: str) -> int:
    """The side of the square token grid behind a positional embedding of `tokens` rows (one is the class)."""
    side = math.isqrt(max(tokens - 1, 0))
    if side == 0 or side * side != tokens - 1:
        raise CheckpointError(f"cannot infer the architecture: {key} has {tokens} rows, not 1 + a square")
    return side


def _mlp_ratio(sd: Mapping[str, torch.Tensor], block: str, width: int) -> float:
    return _get(sd, f"{block}.mlp.c_fc.weight", 2).shape[0] / max(width, 1)  # a width of 0 is refused later


def _vit(sd: Mapping[str, torch.Tensor]) -> VisionConfig:
    conv = _get(sd, "visual.conv1.weight", 4)  # (width, 3, patch, patch)
    width, patch = conv.shape[0], conv.shape[-1]
    grid = _grid(_get(sd, "visual.positional_embedding", 2).shape[0], "visual.positional_embedding")
    layers = _count(sd, "visual.transformer.resblocks.")
    ratio = _mlp_ratio(sd, "visual.transformer.resblocks.0", width)
    return VisionConfig("vit", grid * patch, width, layers, max(1, width // 64), patch, ratio)


def _resnet(sd: Mapping[str, torch.Tensor]) -> VisionConfig:
    layers = tuple(_count(sd, f"visual.layer{stage}.") for stage in (1, 2, 3, 4))
    width = _get(sd, "visual.layer1.0.conv1.weight", 4).shape[0]
    # The attention pool sees the image downsampled 32x: its grid times 32 is the input resolution.
    grid = _grid(
        _get(sd, "visual.attnpool.positional_embedding", 2).shape[0], "visual.attnpool.positional_embedding"
    )
    return VisionConfig("resnet", grid * 32, width, layers, max(1, width * 32 // 64))


def _text(sd: Mapping[str, torch.Tensor]) -> TextConfig:
    width = _get(sd, "ln_final.weight", 1).shape[0]
    return TextConfig(
        context_length=_get(sd, "positional_embedding", 2).shape[0],
        vocab_size=_get(sd, "token_embedding.weight", 2).shape[0],
        width=width,
        heads=max(1, width // 64),
        layers=_count(sd, "transformer.resblocks."),
        mlp_ratio=_mlp_ratio(sd, "transformer.resblocks.0", width),
    )


def infer_config(sd: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """The architecture of OpenAI-layout weights, from tensor shapes alone (works on meta tensors).

    Where a registered config has the same shapes, that config is returned (so registered head counts
    win over the width // 64 rule).
    """
    if "text_projection" not in sd or not any(key.startswith("visual.") for key in sd):
        raise CheckpointError(
            "these are not CLIP weights in OpenAI's layout (no text_projection, no visual.*)"
        )
    vision = _vit(sd) if "visual.proj" in sd else _resnet(sd)
    # "logit_bias": a model trained with the sigmoid loss (the key OpenCLIP uses).
    embed_dim = _get(sd, "text_projection", 2).shape[1]
    config = CLIPConfig(embed_dim, vision, _text(sd), logit_bias="logit_bias" in sd)
    twin = _registered_twin(config)
    return dataclasses.replace(twin, logit_bias=config.logit_bias) if twin else config


def _without_heads(config: CLIPConfig) -> Any:
    # Shapes depend on neither head counts nor the activation; compare everything else (but the bias: any
    # model may have one), MLP ratios as the hidden widths they give (OpenCLIP's ViT-g-14 states 4.3637).
    def hidden(width: int, ratio: float) -> float:
        return float(int(width * ratio))

    v, t = config.vision, config.text
    vision = dataclasses.replace(v, heads=0, mlp_ratio=hidden(v.width, v.mlp_ratio))
    text = dataclasses.replace(t, heads=0, mlp_ratio=hidden(t.width, t.mlp_ratio))
    return dataclasses.replace(config, vision=vision, text=text, activation="", logit_bias=False)


def _registered_twin(config: CLIPConfig) -> CLIPConfig | None:
    """The registered config with these shapes, if their head counts agree; the activation is kept:
    shapes cannot tell it (QuickGELU, OpenAI's, is assumed)."""
    key = _without_heads(config)
    twins = [c for c in MODEL_CONFIGS.values() if _without_heads(c) == key]
    if len({(c.vision.heads, c.text.heads) for c in twins}) != 1:
        return None
    return dataclasses.replace(twins[0], activation=config.activation)
