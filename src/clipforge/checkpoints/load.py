"""The public entry points: `load()` a model from a name, file or directory, and `save()` one.

What `load(name_or_path, pretrained=None)` accepts, in this order:

1. `pretrained` is a path: `name_or_path` names the architecture (a registered name or a `CLIPConfig`),
   and the weights come from that file or directory; their shapes must fit the named architecture.
2. a pretrained name ("ViT-B-32", "ViT-B/32", "RN50", ...): downloaded once into the cache, then read;
   OpenCLIP's ("openclip/ViT-B-32:laion2b_s34b_b79k", or "openclip/ViT-B-32" with pretrained=
   "laion2b_s34b_b79k");
3. a path, recognized by its content: a clipforge directory (config.json + model.safetensors), an OpenCLIP
   hub directory (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin), a
   transformers CLIPModel directory (config.json + model.safetensors or pytorch_model.bin), an OpenAI
   release file (TorchScript archive), an OpenCLIP training checkpoint, a torch.save file holding a state
   dict (zip or legacy format; `{"state_dict": ...}` and `{"model": ...}` wrappers and a DDP `module.`
   prefix are unwrapped), or a `.safetensors` file.

Without a config (directories carry theirs), the architecture is inferred from the tensor shapes, and
held to the same bounds as a config read from a file. Files are untrusted: every tensor's shape is
checked against the architecture (from a safetensors header, before its data is read) before a model is
built. Weights then load with strict key and shape checks into a float32 model, returned in eval mode.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from clipforge.checkpoints import native, registry
from clipforge.checkpoints.fit import check_fits, check_tokenizer_fits, describe, listing, select
from clipforge.checkpoints.openai import StateDict, infer_config, script_tensors
from clipforge.checkpoints.safe_unpickle import (
    CheckpointError,
    ScriptObject,
    is_zip_archive,
    read_archive,
    read_legacy,
)
from clipforge.checkpoints.safetensors_header import is_safetensors, read_header
from clipforge.convert import openclip
from clipforge.models import CLIP, CLIPConfig, create_model
from clipforge.models.config import ALIASES, MODEL_CONFIGS, get_config

__all__ = [
    "Weights", "describe", "load", "load_into", "load_model", "open_model", "read_weights", "resolve", "save",
]  # fmt: skip

PathLike = str | os.PathLike


@dataclass
class Weights:
    """Tensors read from a file, with what the file says about them."""

    state_dict: StateDict  # meta tensors (shapes only) for safetensors read with tensors=False
    config: CLIPConfig | None = None  # clipforge directories carry their config
    tokenizer_dir: Path | None = None
    from_script: bool = False  # a TorchScript tree: take the tensors the model expects, ignore the rest
    tokenizer: Any | None = None  # a tokenizer read with the weights (a transformers directory's)
    preprocess: dict[str, Any] | None = None  # {"mean", "std"} when not OpenAI's (an OpenCLIP hub config)
    note: str | None = None  # what the user should know about how the file was read (a guessed activation)
    format: str = "state dict"  # what the file was recognized as, for messages

    @property
    def is_meta(self) -> bool:
        return any(t.is_meta for t in self.state_dict.values())


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
        raise CheckpointError(f"{path}: entries that are not tensors: {listing(others)}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def read_weights(path: PathLike, tensors: bool = True) -> Weights:
    """Tensors from any supported file or directory, read without running anything from it.

    With `tensors=False`, safetensors files and clipforge directories give meta tensors: the shapes and
    dtypes of their (checked) header, no data read. Pickled files are read whole either way: their
    tensors cannot outgrow the file.
    """
    path = Path(path)
    if path.is_dir():
        return _read_directory(path, tensors)
    if not path.is_file():
        raise CheckpointError(f"no such file or directory: {path}")
    if path.name == native.WEIGHTS_FILE and native.is_native_dir(path.parent):
        return _read_directory(path.parent, tensors)  # clipforge's or a transformers directory
    if path.name in openclip.WEIGHTS_FILES and openclip.is_hub_dir(path.parent):
        return _read_openclip_hub(path.parent, tensors)
    if is_zip_archive(path):
        obj = read_archive(path)
    elif is_safetensors(path):
        return Weights(_read_safetensors(path, tensors), format="safetensors")
    else:
        obj = read_legacy(path)
    if isinstance(obj, ScriptObject):
        return Weights(script_tensors(obj), from_script=True, format="OpenAI TorchScript archive")
    if openclip.is_training_checkpoint(obj):
        config, note = openclip.checkpoint_config(obj, path)
        return Weights(_unwrap(obj, path), config, note=note, format="OpenCLIP checkpoint")
    return Weights(_unwrap(obj, path))


def _native_format(directory: Path) -> bool:
    """Whether `directory`'s config.json is clipforge's (a transformers directory has one too)."""
    try:
        native.read_config(directory)
    except CheckpointError:
        return False
    return True


def _read_directory(directory: Path, tensors: bool) -> Weights:
    if openclip.is_hub_dir(directory):
        return _read_openclip_hub(directory, tensors)
    if not native.is_native_dir(directory):
        raise CheckpointError(
            f"{directory} is a directory without {native.CONFIG_FILE} or {openclip.CONFIG_FILE}: neither a "
            "clipforge save, a transformers CLIPModel nor an OpenCLIP hub directory"
        )
    if _native_format(directory):
        return _read_native(directory, tensors)
    meta = openclip.read_json(directory / native.CONFIG_FILE)
    if isinstance(meta, dict) and (
        meta.get("model_type") == "clip" or "CLIPModel" in meta.get("architectures", ())
    ):
        return _read_hf(directory)
    native.read_config(directory)  # raises, naming what config.json lacks to be clipforge's
    raise AssertionError("unreachable")


def _read_hf(directory: Path) -> Weights:
    from clipforge.convert.hf import read_hf  # transformers itself is not needed to read one

    config, state_dict, tokenizer = read_hf(directory)
    return Weights(state_dict, config, tokenizer=tokenizer, format="transformers CLIPModel directory")


def _read_openclip_hub(directory: Path, tensors: bool) -> Weights:
    config, preprocess = openclip.read_hub_config(directory)
    weights = openclip.hub_weights(directory)
    if is_safetensors(weights):
        state_dict = _read_safetensors(weights, tensors)
    else:
        state_dict = _unwrap(
            read_archive(weights) if is_zip_archive(weights) else read_legacy(weights), weights
        )
    return Weights(state_dict, config, preprocess=preprocess, format="OpenCLIP hub directory")


def _read_safetensors(path: Path, tensors: bool) -> StateDict:
    header = read_header(path)  # bounded and checked against the file size before anything is read
    if not tensors:
        return header
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e


def _read_native(directory: Path, tensors: bool) -> Weights:
    if not native.is_native_dir(directory):
        raise CheckpointError(
            f"{directory} is a directory without {native.CONFIG_FILE}: not a clipforge save"
        )
    ckpt = native.read_native(directory, tensors)
    return Weights(ckpt.state_dict, ckpt.config, ckpt.tokenizer_dir, format="clipforge directory")


def load_into(model: CLIP, weights: Weights, source: PathLike) -> None:
    """Copy the weights into `model` (casting, e.g. fp16 -> fp32), strictly: every key, every shape.

    OpenAI's extra scalars are dropped first; a TorchScript tree contributes only the tensors the model
    expects. Anything missing, unexpected or of the wrong shape raises `CheckpointError`, naming it.
    """
    expected = model.state_dict()
    check_fits(model.config, weights.state_dict, source, weights.from_script, expected)
    model.load_state_dict(select(expected, weights.state_dict, weights.from_script), strict=True)


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
    """(The architecture if it is named, the local path of the weights), downloading named weights.

    `pretrained` is a path, or an OpenCLIP tag with an OpenCLIP architecture ("openclip/ViT-B-32",
    "laion2b_s34b_b79k"), which names the weights "openclip/ViT-B-32:laion2b_s34b_b79k"."""
    registered = registry.registered_name(name_or_path, pretrained)
    if registered is not None:
        return get_config(registry.architecture(registered)), registry.fetch(registered)
    if pretrained is not None and pretrained != "openai":
        return _architecture(name_or_path), Path(pretrained)  # type: ignore[arg-type]
    if isinstance(name_or_path, CLIPConfig):
        raise CheckpointError("a CLIPConfig names no weights: pass pretrained=<path> with it")
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
    return named or weights.config or _inferred_config(weights.state_dict, path)


def _inferred_config(state_dict: StateDict, path: Path) -> CLIPConfig:
    """The architecture of the shapes, held to the bounds and rules of a config read from a file."""
    try:
        config = infer_config(state_dict)
        return CLIPConfig.from_dict(config.to_dict())
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except ValueError as e:  # a config rule the shapes break (ConfigValueError names the field)
        raise CheckpointError(f"{path}: the architecture read from its shapes is refused: {e}") from None


def _open(
    name_or_path: PathLike | CLIPConfig, pretrained: PathLike | None
) -> tuple[CLIPConfig, Weights, Path]:
    """The architecture and the weights, checked against each other on shapes alone: nothing is built
    and no safetensors data is read before every tensor is known to fit."""
    named, path = resolve(name_or_path, pretrained)
    weights = read_weights(path, tensors=False)
    registered = registry.registered_name(name_or_path, pretrained)
    if registered is not None and weights.preprocess is None:  # a bare weights file: the registry knows
        weights.preprocess = registry.get_pretrained(registered).preprocess
    config = _choose_config(named, weights, path)
    if weights.note and named is None and weights.config is None:
        warnings.warn(weights.note, stacklevel=3)
    check_fits(config, weights.state_dict, path, weights.from_script)
    return config, weights, path


def architecture_of(path: PathLike) -> CLIPConfig:
    """The architecture a weights file or directory holds, checked against its shapes; nothing is built
    (a safetensors file or a clipforge directory is read as its header alone)."""
    return _open(path, None)[0]


def _build(config: CLIPConfig, weights: Weights, path: Path, device: Any) -> CLIP:
    if weights.is_meta:
        weights = read_weights(path)
    model = create_model(config)
    load_into(model, weights, path)
    return model.to(device).eval()


def _tokenizer(config: CLIPConfig, weights: Weights, source: Path) -> Any:
    """The saved tokenizer (else OpenAI's) at the model's context length, checked against its vocabulary."""
    from clipforge.tokenizer import get_tokenizer

    context, directory = config.text.context_length, weights.tokenizer_dir
    if weights.tokenizer is not None:
        check_tokenizer_fits(config, weights.tokenizer, source)
        return weights.tokenizer
    if directory is None:
        tokenizer = get_tokenizer(None, context_length=context)
        if tokenizer.vocab_size > config.text.vocab_size:
            raise CheckpointError(
                f"{source}: the model embeds {config.text.vocab_size:,} tokens (text.vocab_size) and "
                f"carries no tokenizer, and OpenAI's has {tokenizer.vocab_size:,}: save the model with its "
                "tokenizer (save(model, dir, tokenizer=...)), or use load_model() and your tokenizer"
            )
        return tokenizer
    try:
        tokenizer = get_tokenizer(directory, context_length=context)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot read its tokenizer: {e}") from None
    check_tokenizer_fits(config, tokenizer, source)
    return tokenizer


def load_model(
    name_or_path: PathLike | CLIPConfig,
    pretrained: PathLike | None = None,
    device: str | torch.device = "cpu",
) -> CLIP:
    """The model alone; see `load`."""
    config, weights, path = _open(name_or_path, pretrained)
    return _build(config, weights, path, device)


def load(
    name_or_path: PathLike | CLIPConfig,
    pretrained: PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CLIP, Callable[[Any], torch.Tensor], Any]:
    """(model in eval mode, image preprocessing for it, tokenizer) from a name, file or directory.

    `load("ViT-B/32")` downloads OpenAI's weights; `load("ViT-B-32.pt")`, `load("run/final")` (a
    clipforge directory) and `load("weights.safetensors")` read local files; `load("ViT-B-32",
    pretrained="ft.pt")` takes the architecture by name and the weights from the file. The model is
    float32 on `device`. The tokenizer is the one saved with a clipforge directory, else OpenAI's; its
    default context length is the model's, so `model.encode_text(tokenizer(texts))` fits, and every id
    it gives has a row in the model's token embedding (checked, before the model is built).
    """
    from clipforge.transforms import image_transform

    config, weights, path = _open(name_or_path, pretrained)
    tokenizer = _tokenizer(config, weights, path)
    model = _build(config, weights, path, device)
    norm = {k: v for k, v in (weights.preprocess or {}).items() if k in ("mean", "std")}
    if weights.preprocess and "unsupported" in weights.preprocess:
        warnings.warn(
            f"{path} asks for preprocessing {weights.preprocess['unsupported']}; clipforge's transform "
            "resizes the shortest side (bicubic) and center-crops",
            stacklevel=2,
        )
    return model, image_transform(config.vision.image_size, **norm), tokenizer


def open_model(
    name_or_path: PathLike | CLIPConfig, pretrained: PathLike | None = None
) -> tuple[CLIP, Weights, Path]:
    """(model on the CPU in eval mode, what was read with it (format, tokenizer, preprocessing, notes),
    the local path), for tools that convert a model and carry the rest along (`clipforge.convert`)."""
    config, weights, path = _open(name_or_path, pretrained)
    model = _build(config, weights, path, "cpu")
    return model, weights, path


def save(model: CLIP, directory: PathLike, tokenizer: Any | None = None) -> Path:
    """Write a clipforge directory (config.json, model.safetensors, tokenizer/) atomically; see `native`.

    A tokenizer whose ids the model cannot embed is refused before anything is written."""
    return native.save_native(model, directory, tokenizer)
