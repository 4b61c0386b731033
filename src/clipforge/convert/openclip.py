"""OpenCLIP's formats: its model configs, training checkpoints and hub directories.

OpenCLIP's own `CLIP` class (both towers built in-house, not `custom_text`) names its tensors exactly as
OpenAI's weight files do, and clipforge's models do too: the state dict crosses unchanged. What differs is
how the architecture is described. OpenCLIP writes a model config (`model_configs/*.json`, or `model_cfg`
inside `open_clip_config.json`):

    {"embed_dim": 512, "quick_gelu": false,
     "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "head_width": 64},
     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}

`config_from_openclip` reads one (missing fields take OpenCLIP's defaults; options that would build a
different network than clipforge's, like LayerScale or attention pooling, are refused by name) and
`config_to_openclip` writes one. The files:

- a training checkpoint (`open_clip_train` writes `{"epoch", "name", "state_dict", "optimizer", ...}`
  with DDP's `module.` prefix): read through the tensor-only unpickler; its architecture comes from the
  run's `params.txt` (`model: ViT-B-32`), else from the shapes (QuickGELU assumed, with a warning).
  `write_checkpoint` writes `{"state_dict": ..., "model_cfg": ...}`: `open_clip.create_model(name,
  pretrained=FILE)` reads the state dict, clipforge the config too.
- a hub directory (`open_clip_config.json` + `open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin`), as on the Hugging Face Hub; `open_clip.create_model("local-dir:DIR")`
  loads one that `write_hub` wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints import native
from clipforge.checkpoints.native import unshared_tensors
from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.models.config import MODEL_CONFIGS, PAPER_MODELS, CLIPConfig
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

CONFIG_FILE = "open_clip_config.json"
SAFETENSORS_FILE = "open_clip_model.safetensors"
WEIGHTS_FILES = (SAFETENSORS_FILE, "open_clip_pytorch_model.bin")  # in the order they are preferred
PARAMS_FILE = "params.txt"  # open_clip_train's record of a run's arguments
MAX_JSON_BYTES = 1 << 20  # an open_clip_config.json is ~1 KB
PREFIX = "openclip/"  # clipforge's names for OpenCLIP's architectures

# OpenCLIP's defaults for fields a model config leaves out (its CLIPVisionCfg and CLIPTextCfg).
VISION_DEFAULTS = {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0}
TEXT_DEFAULTS = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 512,
    "heads": 8,
    "layers": 12,
    "mlp_ratio": 4.0,
}

_ANY = object()
# Options that leave the network as clipforge builds it, with the values that do (_ANY: any value, for
# options that only matter in training or to OpenCLIP's bookkeeping). Any other option, or another value,
# is refused by name: loading the weights into a different network would silently compute another function.
_NEUTRAL = {
    "": {
        "custom_text": False, "cast_dtype": _ANY, "init_logit_scale": _ANY, "multimodal_cfg": None,
        "nonscalar_logit_scale": False,
    },
    "vision_cfg": {
        "patch_dropout": _ANY, "ls_init_value": None, "attentional_pool": False,
        "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
        "output_tokens": False, "timm_model_name": None, "act_kwargs": None, "norm_kwargs": None,
        "input_patchnorm": False, "global_average_pool": False,
    },
    "text_cfg": {
        "ls_init_value": None, "hf_model_name": None, "hf_tokenizer_name": None, "embed_cls": False,
        "pad_id": 0, "output_tokens": False, "no_causal_mask": False, "proj_bias": False,
        "pool_type": "argmax", "act_kwargs": None, "norm_kwargs": None, "tokenizer_kwargs": None,
    },
}  # fmt: skip
_USED = {
    "": ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_bias"),
    "vision_cfg": ("image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"),
}


# ---- model configs ------------------------------------------------------------------------------------


def _section(d: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: OpenCLIP config field '{name or 'model_cfg'}' must be an object")
    for key, value in d.items():
        field = f"{name}.{key}" if name else key
        if key in _USED[name]:
            continue
        if key not in _NEUTRAL[name]:
            raise CheckpointError(f"{where}: OpenCLIP config field '{field}' is not supported by clipforge")
        neutral = _NEUTRAL[name][key]
        if neutral is not _ANY and value != neutral:
            raise CheckpointError(
                f"{where}: OpenCLIP config field '{field}' = {json.dumps(value)[:40]} builds a network "
                f"clipforge does not have (it supports {json.dumps(neutral)})"
            )
    return d


def config_from_openclip(model_cfg: Any, where: str | os.PathLike = "model_cfg") -> CLIPConfig:
    """A `CLIPConfig` from an OpenCLIP model config, checked like any config read from a file.

    Raises `CheckpointError` naming `where` and the field: an unknown option, an option that changes the
    network (LayerScale, attention pooling, a Hugging Face text tower...), or a value out of bounds."""
    where = str(where)
    top = _section(model_cfg, "", where)
    vision = {**VISION_DEFAULTS, **_section(top.get("vision_cfg", {}), "vision_cfg", where)}
    text = {**TEXT_DEFAULTS, **_section(top.get("text_cfg", {}), "text_cfg", where)}
    for section, key in (("vision_cfg", "head_width"), ("vision_cfg", "width")):
        if type(vision[key]) is not int or vision[key] < 1:
            raise CheckpointError(
                f"{where}: OpenCLIP config field '{section}.{key}' must be a positive integer"
            )
    resnet = isinstance(vision["layers"], list | tuple)
    # OpenCLIP gives a head width: a ViT has width // head_width heads, a ResNet's attention pool
    # (on 32 x width channels) 32 * width // head_width.
    channels = vision["width"] * 32 if resnet else vision["width"]
    d = {
        "embed_dim": top.get("embed_dim"),
        "vision": {
            "kind": "resnet" if resnet else "vit",
            "image_size": vision["image_size"],
            "width": vision["width"],
            "layers": list(vision["layers"]) if resnet else vision["layers"],
            "heads": channels // vision["head_width"],
            "patch_size": 0 if resnet else vision.get("patch_size", 16),  # OpenCLIP's default: 16
            "mlp_ratio": vision["mlp_ratio"],
        },
        "text": {k: text[k] for k in _USED["text_cfg"]},
        "activation": "quick_gelu" if top.get("quick_gelu", False) is True else "gelu",
        "logit_bias": top.get("init_logit_bias") is not None,
    }
    if not isinstance(top.get("quick_gelu", False), bool):
        raise CheckpointError(f"{where}: OpenCLIP config field 'quick_gelu' must be true or false")
    try:
        return CLIPConfig.from_dict(d)
    except ValueError as e:  # ConfigValueError names clipforge's field; the OpenCLIP names are close
        raise CheckpointError(
            f"{where}: the OpenCLIP config gives an architecture clipforge refuses: {e}"
        ) from None


def config_to_openclip(config: CLIPConfig) -> dict[str, Any]:
    """The OpenCLIP model config of `config`: `open_clip.create_model` builds the same network from it."""
    v, t = config.vision, config.text
    resnet = v.kind == "resnet"
    channels = v.width * 32 if resnet else v.width
    vision: dict[str, Any] = {"image_size": v.image_size, "layers": list(v.layers) if resnet else v.layers}
    vision.update(width=v.width, head_width=channels // v.heads, mlp_ratio=v.mlp_ratio)
    vision["patch_size"] = None if resnet else v.patch_size
    cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.activation == "quick_gelu",
        "vision_cfg": vision,
        "text_cfg": {k: getattr(t, k) for k in _USED["text_cfg"]},
    }
    if config.logit_bias:
        cfg["init_logit_bias"] = -10.0  # only its presence matters: the value is overwritten by the weights
    return cfg


def openclip_name(config: CLIPConfig) -> str | None:
    """OpenCLIP's name for this architecture (for `open_clip.create_model(name, pretrained=FILE)`), if
    it has one: OpenAI's models are OpenCLIP's "-quickgelu" ones."""
    for name, registered in MODEL_CONFIGS.items():
        if registered == config:
            if name.startswith(PREFIX):
                return name[len(PREFIX) :]
            if name in PAPER_MODELS:
                return f"{name}-quickgelu"
    return None


def preprocess_cfg(config: CLIPConfig) -> dict[str, Any]:
    """OpenCLIP's preprocessing entry for clipforge's eval transform (OpenAI's)."""
    return {
        "size": [config.vision.image_size] * 2,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


# ---- reading ------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return native.read_json(path, MAX_JSON_BYTES, "an OpenCLIP config")


def is_hub_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def read_hub_config(directory: str | os.PathLike) -> tuple[CLIPConfig, dict[str, Any] | None]:
    """(architecture, preprocessing: {"mean", "std"} or None for OpenAI's) of a hub directory."""
    path = Path(directory) / CONFIG_FILE
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not an OpenCLIP config (not a JSON object)")
    config = config_from_openclip(meta.get("model_cfg", meta), path)
    return config, _preprocessing(meta.get("preprocess_cfg"), path)


def _preprocessing(cfg: Any, path: Path) -> dict[str, Any] | None:
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: 'preprocess_cfg' must be an object")
    out: dict[str, Any] = {}
    for key, default in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
        value = cfg.get(key, list(default))
        ok = isinstance(value, list) and len(value) == 3 and all(type(x) in (int, float) for x in value)
        if not ok or (key == "std" and min(value) <= 0):
            raise CheckpointError(f"{path}: 'preprocess_cfg.{key}' must be 3 numbers (std above 0)")
        out[key] = tuple(float(x) for x in value)
    unlike = {
        k: cfg[k]
        for k in ("interpolation", "resize_mode")
        if cfg.get(k, None) not in (None, "bicubic", "shortest")
    }
    if unlike:
        out["unsupported"] = unlike  # clipforge's transform resizes bicubic, shortest side: the caller warns
    if out["mean"] == tuple(OPENAI_MEAN) and out["std"] == tuple(OPENAI_STD) and not unlike:
        return None
    return out


def hub_weights(directory: str | os.PathLike) -> Path:
    """The weights file of a hub directory (safetensors preferred)."""
    directory = Path(directory)
    for name in WEIGHTS_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory} has {CONFIG_FILE} but no weights ({' or '.join(WEIGHTS_FILES)})")


def is_training_checkpoint(obj: Any) -> bool:
    """A torch.save'd dict shaped like OpenCLIP's: a "state_dict" beside "epoch" (open_clip_train's) or
    "model_cfg" (`write_checkpoint`'s)."""
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state_dict"), Mapping)
        and ("epoch" in obj or "model_cfg" in obj)
    )


def checkpoint_config(obj: Mapping[str, Any], path: Path) -> tuple[CLIPConfig | None, str | None]:
    """(architecture, or None to infer it from the shapes; a note to show the user) of a checkpoint: its
    own "model_cfg", else the run's params.txt (`<run>/checkpoints/epoch_N.pt` beside `<run>/params.txt`)."""
    if "model_cfg" in obj:
        return config_from_openclip(obj["model_cfg"], f"{path} (model_cfg)"), None
    for params in (path.parent.parent / PARAMS_FILE, path.parent / PARAMS_FILE):
        if params.is_file():
            return _params_config(params)
    note = (
        f"{path}: an OpenCLIP training checkpoint without its run's {PARAMS_FILE}: the architecture is "
        "inferred from the shapes and QuickGELU assumed; OpenCLIP's plain names use GELU: name it, e.g. "
        "load('openclip/ViT-B-32', pretrained=FILE)"
    )
    return None, note


def _params_config(path: Path) -> tuple[CLIPConfig | None, str | None]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is over {MAX_JSON_BYTES:,} bytes: not open_clip_train's {PARAMS_FILE}")
    params: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            params[key.strip()] = value.strip()
    model = params.get("model", "")
    quick = params.get("force_quick_gelu", "False") == "True" and not model.endswith("-quickgelu")
    name = PREFIX + model + ("-quickgelu" if quick else "")
    if name in MODEL_CONFIGS:
        return MODEL_CONFIGS[name], None
    note = (
        f"{path} names model {model!r}, which clipforge does not register: the architecture is inferred "
        "from the shapes and QuickGELU assumed"
    )
    return None, note


# ---- writing ------------------------------------------------------------------------------------------


def write_checkpoint(model: Any, path: Path) -> None:
    """`{"state_dict", "model_cfg"}` with torch.save: tensors and plain JSON values only, so
    `torch.load(weights_only=True)`, OpenCLIP's default, reads it."""
    torch.save({"state_dict": unshared_tensors(model), "model_cfg": config_to_openclip(model.config)}, path)


def write_hub(model: Any, directory: Path) -> None:
    """`open_clip_config.json` + `open_clip_model.safetensors` into an existing, empty `directory`."""
    from safetensors.torch import save_file

    meta = {"model_cfg": config_to_openclip(model.config), "preprocess_cfg": preprocess_cfg(model.config)}
    save_file(unshared_tensors(model), directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
