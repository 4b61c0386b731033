"""The public entry points: `load()` a model from a name, file or directory, and `save()` one.

What `load(name_or_path, pretrained=None)` accepts, in this order:

1. `pretrained` is a path: `name_or_path` names the architecture (a registered name or a `CLIPConfig`),
   and the weights come from that file or directory; their shapes must fit the named architecture.
2. a pretrained name ("ViT-B-32", "ViT-B/32", "RN50", ...): downloaded once into the cache, then read;
3. a path: a clipforge directory (config.json + model.safetensors), an OpenAI release file (TorchScript
   archive), a torch.save file holding a state dict (zip or legacy format; `{"state_dict": ...}` and
   `{"model": ...}` wrappers and a DDP `module.` prefix are unwrapped), or a `.safetensors` file.

Without a config (directories carry theirs), the architecture is inferred from the tensor shapes.
Weights load with strict key and shape checks into a float32 model, which is returned in eval mode.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from clipforge.checkpoints import native, registry
from clipforge.checkpoints.openai import KNOWN_EXTRAS, StateDict, infer_config, script_tensors
from clipforge.checkpoints.safe_unpickle import (
    CheckpointError,
    ScriptObject,
    is_zip_archive,
    read_archive,
    read_legacy,
)
from clipforge.models import CLIP, CLIPConfig, create_model
from clipforge.models.config import ALIASES, MODEL_CONFIGS, get_config

PathLike = str | os.PathLike


@dataclass
class Weights:
    """Tensors read from a file, with what the file says about them."""

    state_dict: StateDict
    config: CLIPConfig | None = None  # clipforge directories carry their config
    tokenizer_dir: Path | None = None
    from_script: bool = False  # a TorchScript tree: take the tensors the model expects, ignore the rest


def _is_safetensors(path: Path) -> bool:
    # 8 bytes of little-endian header length, then the JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 0


def _unwrap(obj: Any, path: Path) -> StateDict:
    """The state dict inside a torch.save'd object."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{path}: entries that are not tensors: {_listing(others)}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def read_weights(path: PathLike) -> Weights:
    """Tensors from any supported file or directory, read without running anything from it."""
    path = Path(path)
    if path.is_dir():
        return _read_native(path)
    if not path.is_file():
        raise CheckpointError(f"no such file or directory: {path}")
    if path.name == native.WEIGHTS_FILE and native.is_native_dir(path.parent):
        return _read_native(path.parent)
    if is_zip_archive(path):
        obj = read_archive(path)
    elif _is_safetensors(path):
        return Weights(_read_safetensors(path))
    else:
        obj = read_legacy(path)
    if isinstance(obj, ScriptObject):
        return Weights(script_tensors(obj), from_script=True)
    return Weights(_unwrap(obj, path))


def _read_safetensors(path: Path) -> StateDict:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e


def _read_native(directory: Path) -> Weights:
    if not native.is_native_dir(directory):
        raise CheckpointError(
            f"{directory} is a directory without {native.CONFIG_FILE}: not a clipforge save"
        )
    ckpt = native.read_native(directory)
    return Weights(ckpt.state_dict, ckpt.config, ckpt.tokenizer_dir)


def describe(config: CLIPConfig) -> str:
    """A one-line summary of an architecture, for messages."""
    v, t = config.vision, config.text
    if v.kind == "vit":
        vision = f"ViT {v.image_size}px patch {v.patch_size} width {v.width} x{v.layers}"
    else:
        vision = f"ResNet {v.image_size}px width {v.width} stages {v.layers}"
    text = f"text width {t.width} x{t.layers}, context {t.context_length}"
    bias = "; logit bias" if config.logit_bias else ""
    return f"{vision}; {text}; embed {config.embed_dim}{bias}"


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_into(model: CLIP, weights: Weights, source: PathLike) -> None:
    """Copy the weights into `model` (casting, e.g. fp16 -> fp32), strictly: every key, every shape.

    OpenAI's extra scalars are dropped first; a TorchScript tree contributes only the tensors the model
    expects. Anything missing, unexpected or of the wrong shape raises `CheckpointError`, naming it.
    """
    expected = model.state_dict()
    sd = {k: v for k, v in weights.state_dict.items() if k in expected or k not in KNOWN_EXTRAS}
    if weights.from_script:
        sd = {k: v for k, v in sd.items() if k in expected}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = [
        f"{label}: {_listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        arch = describe(model.config)
        raise CheckpointError(f"{source} does not fit the architecture ({arch}): " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def _architecture(name: str | CLIPConfig) -> CLIPConfig:
    if isinstance(name, CLIPConfig):
        return name
    try:
        return get_config(name)
    except KeyError:
        raise CheckpointError(
            f"unknown architecture {name!r}; available: {', '.join(MODEL_CONFIGS)}"
        ) from None


def resolve(
    name_or_path: PathLike | CLIPConfig, pretrained: PathLike | None = None
) -> tuple[CLIPConfig | None, Path]:
    """(The architecture if it is named, the local path of the weights), downloading named weights."""
    if pretrained is not None and pretrained != "openai":
        return _architecture(name_or_path), Path(pretrained)  # type: ignore[arg-type]
    if isinstance(name_or_path, CLIPConfig):
        raise CheckpointError("a CLIPConfig names no weights: pass pretrained=<path> with it")
    if isinstance(name_or_path, str) and registry.has_pretrained(name_or_path):
        return get_config(registry.canonical_name(name_or_path)), registry.fetch(name_or_path)
    if os.path.exists(name_or_path):
        return None, Path(name_or_path)
    names = ", ".join(registry.available_pretrained())
    if name_or_path in MODEL_CONFIGS or name_or_path in ALIASES:
        raise CheckpointError(
            f"{name_or_path!r} is an architecture without released weights; pretrained models: {names}. "
            f"Use create_model({name_or_path!r}) for a fresh model, or pass pretrained=<path>"
        )
    raise CheckpointError(f"{name_or_path!r} is neither a file or directory nor a pretrained model: {names}")


def _choose_config(named: CLIPConfig | None, weights: Weights, path: Path) -> CLIPConfig:
    if named is not None and weights.config is not None and named != weights.config:
        got, want = describe(weights.config), describe(named)
        raise CheckpointError(f"{path} was saved for another architecture ({got}) than requested ({want})")
    return named or weights.config or infer_config(weights.state_dict)


def _load(
    name_or_path: PathLike | CLIPConfig, pretrained: PathLike | None, device: Any
) -> tuple[CLIP, Path | None]:
    named, path = resolve(name_or_path, pretrained)
    weights = read_weights(path)
    model = create_model(_choose_config(named, weights, path))
    load_into(model, weights, path)
    return model.to(device).eval(), weights.tokenizer_dir


def load_model(
    name_or_path: PathLike | CLIPConfig,
    pretrained: PathLike | None = None,
    device: str | torch.device = "cpu",
) -> CLIP:
    """The model alone; see `load`."""
    return _load(name_or_path, pretrained, device)[0]


def load(
    name_or_path: PathLike | CLIPConfig,
    pretrained: PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CLIP, Callable[[Any], torch.Tensor], Any]:
    """(model in eval mode, image preprocessing for it, tokenizer) from a name, file or directory.

    `load("ViT-B/32")` downloads OpenAI's weights; `load("ViT-B-32.pt")`, `load("run/final")` (a
    clipforge directory) and `load("weights.safetensors")` read local files; `load("ViT-B-32",
    pretrained="ft.pt")` takes the architecture by name and the weights from the file. The model is
    float32 on `device`. The tokenizer is the one saved with a clipforge directory, else the default.
    """
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import image_transform

    model, tokenizer_dir = _load(name_or_path, pretrained, device)
    return model, image_transform(model.config.vision.image_size), get_tokenizer(tokenizer_dir)


def save(model: CLIP, directory: PathLike, tokenizer: Any | None = None) -> Path:
    """Write a clipforge directory (config.json, model.safetensors, tokenizer/) atomically; see `native`."""
    return native.save_native(model, directory, tokenizer)
