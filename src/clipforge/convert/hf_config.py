"""transformers' CLIP configs (`config.json`, `preprocessor_config.json`) to and from clipforge's.

Reading is strict, as for any file: every field that changes the function the model computes is checked
for its type, its range (clipforge's config bounds) and whether clipforge computes the same thing with it
(one activation for both towers, LayerNorm epsilon 1e-5, RGB input, square images). Fields that do not
(dropouts, initializers) are ignored. transformers' defaults fill the fields a file leaves out.
"""

from __future__ import annotations

import math
import os
from typing import Any

from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.models.clip import INIT_LOGIT_SCALE
from clipforge.models.config import (
    MAX_CONTEXT_LENGTH,
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_MLP_RATIO,
    MAX_VOCAB_SIZE,
    MAX_WIDTH,
    CLIPConfig,
)
from clipforge.models.layers import ACTIVATIONS

__all__ = ["check_convertible", "config_from_hf", "config_to_hf", "preprocessor_config"]

LAYER_NORM_EPS = 1e-5  # clipforge's LayerNorms: PyTorch's default, as in OpenAI's code

# transformers' defaults (CLIPTextConfig, CLIPVisionConfig, CLIPConfig) for the fields read here.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
PROJECTION_DIM_DEFAULT = 512

# The largest value of each integer field: clipforge's bounds for a config read from a file.
INT_BOUNDS = {
    "projection_dim": MAX_WIDTH,
    "hidden_size": MAX_WIDTH,
    "intermediate_size": int(MAX_WIDTH * MAX_MLP_RATIO),
    "num_hidden_layers": MAX_LAYERS,
    "num_attention_heads": MAX_WIDTH,
    "max_position_embeddings": MAX_CONTEXT_LENGTH,
    "vocab_size": MAX_VOCAB_SIZE,
    "num_channels": 3,
    "image_size": MAX_IMAGE_SIZE,
    "patch_size": MAX_IMAGE_SIZE,
}

# OpenAI's normalization (OpenAI's CLIP code; transformers' OPENAI_CLIP_MEAN and OPENAI_CLIP_STD).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def check_convertible(config: CLIPConfig) -> None:
    """Refuse what transformers' CLIPModel cannot hold."""
    if config.vision.kind != "vit":
        raise CheckpointError(
            "transformers has no ResNet CLIP (its CLIPModel is ViT-only): keep this model as a clipforge "
            "directory or export it to ONNX"
        )
    if config.logit_bias:
        raise CheckpointError(
            "transformers' CLIPModel has no logit bias (a SigLIP-style model): not convertible"
        )


def config_to_hf(config: CLIPConfig, sot_token_id: int, eot_token_id: int) -> dict[str, Any]:
    """transformers' CLIPConfig JSON for `config`; the token ids are the tokenizer's start and end tokens."""
    check_convertible(config)
    v, t = config.vision, config.text
    common = {
        "hidden_act": config.activation,
        "layer_norm_eps": LAYER_NORM_EPS,
        "projection_dim": config.embed_dim,
    }
    text = {
        "model_type": "clip_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": int(t.width * t.mlp_ratio),  # the hidden width clipforge's MLP has
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length,
        **common,
        # transformers reads a text at its first eos_token_id; clipforge at the argmax of its ids. Both
        # are the end token: the tokenizer's largest id, given once per text, before the padding.
        "bos_token_id": sot_token_id,
        "eos_token_id": eot_token_id,
        "pad_token_id": eot_token_id,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": int(v.width * v.mlp_ratio),
        "num_hidden_layers": int(v.layers),
        "num_attention_heads": v.heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        **common,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": round(
            INIT_LOGIT_SCALE, 4
        ),  # for training from scratch; weights hold theirs
        "dtype": "float32",
        "text_config": text,
        "vision_config": vision,
    }


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor's settings for clipforge's eval transform: a bicubic resize of the shortest
    side, a center crop, [0, 1] scaling and OpenAI's mean and std."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL's BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_convert_rgb": True,
    }


def config_from_hf(d: Any, where: str | os.PathLike) -> CLIPConfig:
    """clipforge's config from transformers' CLIPConfig JSON; errors name `where` and the field."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    if d.get("model_type") != "clip":
        raise CheckpointError(
            f"{where}: field 'model_type' is {d.get('model_type')!r}; a CLIPModel's is 'clip'"
        )
    text = _section(d, "text_config", TEXT_DEFAULTS, where)
    vision = _section(d, "vision_config", VISION_DEFAULTS, where)
    if text["hidden_act"] != vision["hidden_act"]:
        acts = f"{text['hidden_act']!r} and {vision['hidden_act']!r}"
        raise CheckpointError(
            f"{where}: the towers' activations are {acts}; a clipforge model has one for both"
        )
    if vision["num_channels"] != 3:
        raise CheckpointError(f"{where}: field 'vision_config.num_channels' must be 3 (RGB)")
    projection = {"projection_dim": d.get("projection_dim", PROJECTION_DIM_DEFAULT)}
    model = {
        "embed_dim": _int(projection, "projection_dim", where, ""),
        "activation": text["hidden_act"],
        "vision": {
            "kind": "vit",
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"],
            "heads": vision["num_attention_heads"],
            "mlp_ratio": _ratio(vision["intermediate_size"], vision["hidden_size"]),
        },
        "text": {
            "context_length": text["max_position_embeddings"],
            "vocab_size": text["vocab_size"],
            "width": text["hidden_size"],
            "heads": text["num_attention_heads"],
            "layers": text["num_hidden_layers"],
            "mlp_ratio": _ratio(text["intermediate_size"], text["hidden_size"]),
        },
    }
    try:
        return CLIPConfig.from_dict(model)  # the bounds and rules of any config read from a file
    except ValueError as e:  # heads that do not divide a width, patches that do not tile the image
        raise CheckpointError(f"{where}: the architecture it describes is refused: {e}") from None


def _section(d: dict[str, Any], key: str, defaults: dict[str, Any], where: Any) -> dict[str, Any]:
    """One tower's fields, defaults filled in, each checked for its type and range."""
    section = d.get(key)
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: field '{key}' must be an object")
    out = {**defaults, **{k: v for k, v in section.items() if k in defaults}}
    for name in ("image_size", "patch_size"):  # transformers also takes [height, width]: square only
        value = out.get(name)
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
            out[name] = value[0]
    for name in out:
        if name in INT_BOUNDS:
            out[name] = _int(out, name, where, f"{key}.")
    if out["layer_norm_eps"] != LAYER_NORM_EPS:
        eps = out["layer_norm_eps"]
        raise CheckpointError(
            f"{where}: field '{key}.layer_norm_eps' is {eps!r}; clipforge's LayerNorms use 1e-05"
        )
    # transformers' "gelu" is the exact (erf) GELU, clipforge's too; its tanh variants are other functions.
    if out["hidden_act"] not in ACTIVATIONS:
        act, known = out["hidden_act"], ", ".join(ACTIVATIONS)
        raise CheckpointError(f"{where}: field '{key}.hidden_act' is {act!r}; clipforge has {known}")
    return out


def _int(section: dict[str, Any], name: str, where: Any, prefix: str) -> int:
    value, high = section[name], INT_BOUNDS[name]
    if type(value) is not int or not 1 <= value <= high:  # bool is an int subclass: refused too
        raise CheckpointError(
            f"{where}: field '{prefix}{name}' must be an integer from 1 to {high:,}, got {str(value)[:40]}"
        )
    return value


def _ratio(hidden: int, width: int) -> float:
    """The mlp_ratio for which the model's int(width * mlp_ratio) is exactly `hidden`."""
    ratio = hidden / width
    if int(width * ratio) != hidden:  # hidden / width rounded down a hair
        ratio = math.nextafter(ratio, math.inf)
    return ratio
