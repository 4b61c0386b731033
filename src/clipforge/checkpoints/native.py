"""clipforge's own format: a directory with `config.json`, `model.safetensors` and optionally `tokenizer/`.

`config.json` holds `{"format": "clipforge", "format_version": 1, "model": <CLIPConfig.to_dict()>,
"tokenizer": {"path": "tokenizer"} | null}`. The weights are safetensors (no pickle, nothing executable).
A save is written into a temporary directory beside the target and renamed into place, so a reader never
sees a half-written model; an existing clipforge directory at the target is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.models.config import CLIPConfig

FORMAT = "clipforge"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class NativeCheckpoint:
    config: CLIPConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_dir: Path | None


def is_native_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a clipforge directory, format-checked."""
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f'{path} is not a clipforge config (no "format": "{FORMAT}")')
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta.get('format_version')!r}; this clipforge "
            f"reads up to {FORMAT_VERSION}"
        )
    return meta


def read_native(directory: str | os.PathLike) -> NativeCheckpoint:
    directory = Path(directory)
    meta = read_config(directory)
    try:
        config = CLIPConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: invalid model config ({type(e).__name__}: {e})"
        ) from e
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    tokenizer = (meta.get("tokenizer") or {}).get("path")
    tokenizer_dir = directory / tokenizer if tokenizer else None
    try:
        state_dict = load_file(weights)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    return NativeCheckpoint(config, state_dict, tokenizer_dir)


def _unshared_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors stores each tensor on its own: contiguous, no two sharing memory.
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        ptr = value.untyped_storage().data_ptr()
        if not value.is_contiguous() or ptr in seen:
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        tensors[name] = value
    return tensors


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(directory: Path, model: nn.Module, tokenizer: Any | None) -> None:
    config: CLIPConfig = model.config
    save_file(_unshared_tensors(model), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "tokenizer": {"path": TOKENIZER_DIR} if tokenizer is not None else None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync(path)


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it exists and is not a directory")
    if any(target.iterdir()) and not is_native_dir(target):
        raise CheckpointError(f"cannot save to {target}: a non-empty directory that is not a clipforge save")


def _swap_in(tmp: Path, target: Path) -> None:
    # Rename the finished directory into place; an older save at the target is set aside, then removed.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def save_native(model: nn.Module, directory: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write `model` (a clipforge CLIP) and optionally its tokenizer as a clipforge directory, atomically."""
    target = Path(directory).absolute()
    if not isinstance(getattr(model, "config", None), CLIPConfig):
        raise TypeError(
            f"save() needs a clipforge CLIP model (with a CLIPConfig .config), got {type(model).__name__}"
        )
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        _write(tmp, model, tokenizer)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
