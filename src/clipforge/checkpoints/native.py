"""clipforge's own format: a directory with `config.json`, `model.safetensors` and optionally `tokenizer/`.

`config.json` holds `{"format": "clipforge", "format_version": 1, "model": <CLIPConfig.to_dict()>,
"tokenizer": {"path": "tokenizer"} | null}`. The weights are safetensors (no pickle, nothing executable).
A save is written into a temporary directory beside the target and renamed into place, so a reader never
sees a half-written model; an existing clipforge directory at the target is replaced.

A directory read is untrusted: `config.json` is bounded in size and parsed field by field, every path in
it must stay inside the directory, and the weights' header must hold exactly the tensors the config
implies before a tensor is read (docs/loading.md lists the rules).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipforge.atomic import write_directory
from clipforge.checkpoints.fit import check_fits, check_tokenizer_fits
from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.checkpoints.safetensors_header import read_header
from clipforge.models.config import CLIPConfig
from clipforge.tokenizer.core import CONFIG_FILE as TOKENIZER_CONFIG
from clipforge.tokenizer.core import MERGES_FILE as TOKENIZER_MERGES

FORMAT = "clipforge"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MAX_CONFIG_BYTES = 1 << 20  # a config.json is ~1 KB


@dataclass
class NativeCheckpoint:
    config: CLIPConfig
    state_dict: dict[str, torch.Tensor]  # meta tensors (shapes only) when read with tensors=False
    tokenizer_dir: Path | None


def is_native_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def inside(directory: Path, relative: str, what: str) -> Path:
    """`directory / relative`, refused unless it stays inside `directory` once symlinks are resolved."""
    if os.path.isabs(relative):
        raise CheckpointError(f"{directory}: {what} {relative!r} is an absolute path; it must be relative")
    path = directory / relative
    try:
        target, root = path.resolve(), directory.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise CheckpointError(f"{directory}: {what} {relative!r} cannot be resolved: {e}") from None
    if not target.is_relative_to(root):
        raise CheckpointError(
            f"{directory}: {what} {relative!r} leads outside the model directory (to {target})"
        )
    return path


def read_json(path: Path, max_bytes: int, what: str) -> Any:
    """A JSON file from a model directory (untrusted): its size bounded before it is read, any failure a
    `CheckpointError` naming the file."""
    try:
        if path.stat().st_size > max_bytes:
            raise CheckpointError(f"{path} is over {max_bytes:,} bytes: not {what}")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a clipforge directory, format-checked (the model config unparsed)."""
    directory = Path(directory)
    path = inside(directory, CONFIG_FILE, "the config")
    meta = read_json(path, MAX_CONFIG_BYTES, "a model config")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f'{path} is not a clipforge config (no "format": "{FORMAT}")')
    version = meta.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this clipforge reads 1 to {FORMAT_VERSION}"
        )
    unknown = [k for k in meta if k not in ("format", "format_version", "model", "tokenizer")]
    if unknown:
        raise CheckpointError(f"{directory}: {CONFIG_FILE} has an unknown field {unknown[0]!r}")
    return meta


def read_model_config(directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> CLIPConfig:
    """The model's config from `config.json`, every field type- and bounds-checked."""
    directory = Path(directory)
    meta = read_config(directory) if meta is None else meta
    if "model" not in meta:
        raise CheckpointError(f"{directory}: {CONFIG_FILE} field 'model' is missing")
    try:
        return CLIPConfig.from_dict(meta["model"], where="model")
    except ValueError as e:  # ConfigValueError, or a check of the dataclasses themselves
        raise CheckpointError(f"{directory}: {CONFIG_FILE} {e}") from None


def tokenizer_dir(directory: str | os.PathLike, meta: dict[str, Any]) -> Path | None:
    """The saved tokenizer `config.json` names (None: none saved), checked to lie inside the directory."""
    directory = Path(directory)
    entry = meta.get("tokenizer")
    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) != {"path"} or not isinstance(entry["path"], str):
        raise CheckpointError(
            f'{directory}: {CONFIG_FILE} field \'tokenizer\' must be null or {{"path": "<dir>"}}, '
            f"got {json.dumps(entry)[:60]}"
        )
    path = inside(directory, entry["path"], "the tokenizer path")
    if not (path / TOKENIZER_CONFIG).is_file():
        raise CheckpointError(f"{directory}: the tokenizer {entry['path']!r} has no {TOKENIZER_CONFIG}")
    for name in (TOKENIZER_CONFIG, TOKENIZER_MERGES):
        inside(directory, f"{entry['path']}/{name}", "the tokenizer file")
    return path


def read_native(directory: str | os.PathLike, tensors: bool = True) -> NativeCheckpoint:
    """A clipforge directory, validated before a tensor is read: the config field by field, every path
    inside the directory, and the safetensors header against the shapes the config implies.
    `tensors=False` stops there, with meta tensors for the weights."""
    directory = Path(directory)
    meta = read_config(directory)
    config = read_model_config(directory, meta)
    weights = inside(directory, WEIGHTS_FILE, "the weights file")
    if not weights.is_file():
        raise CheckpointError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    tokenizer = tokenizer_dir(directory, meta)
    header = read_header(weights)
    check_fits(config, header, weights)
    if not tensors:
        return NativeCheckpoint(config, header, tokenizer)
    try:
        state_dict = load_file(weights)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    return NativeCheckpoint(config, state_dict, tokenizer)


def unshared_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, each contiguous and with storage of its own, as safetensors wants
    (copied only where needed: a 2.5 B-parameter model is 10 GB in fp32); floats cast to `dtype`."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        ptr = value.untyped_storage().data_ptr()
        if not value.is_contiguous() or ptr in seen:
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        tensors[name] = value
    return tensors


def _write(directory: Path, model: nn.Module, tokenizer: Any | None) -> None:
    config: CLIPConfig = model.config
    save_file(unshared_tensors(model), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "tokenizer": {"path": TOKENIZER_DIR} if tokenizer is not None else None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it exists and is not a directory")
    if any(target.iterdir()) and not is_native_dir(target):
        raise CheckpointError(f"cannot save to {target}: a non-empty directory that is not a clipforge save")


def save_native(model: nn.Module, directory: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write `model` (a clipforge CLIP) and optionally its tokenizer as a clipforge directory, atomically."""
    target = Path(directory).absolute()
    if not isinstance(getattr(model, "config", None), CLIPConfig):
        raise TypeError(
            f"save() needs a clipforge CLIP model (with a CLIPConfig .config), got {type(model).__name__}"
        )
    if tokenizer is not None:
        check_tokenizer_fits(model.config, tokenizer, target)
    _check_replaceable(target)
    write_directory(target, lambda tmp: _write(tmp, model, tokenizer))
    return target
