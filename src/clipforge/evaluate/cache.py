"""A content-addressed feature cache, so each model encodes each evaluation set once.

An entry's key is the SHA-256 of a JSON description of everything the features depend on:
- the model: the SHA-256 of its weights file (for a clipforge directory, of config.json and
  model.safetensors), whatever path or name it was loaded by;
- images: each image's file, byte offset and size, and each file's size and modification time; the eval
  transform's parameters; the feature layer;
- texts: the texts themselves, the tokenizer's identity and the context length.
An entry is `<dir>/<key[:2]>/<key>.safetensors` (tensor "features"; the description in its metadata),
written under a temporary name and renamed into place, so an interrupted run never leaves half an entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipforge.evaluate.images import ImageRef


def default_cache_dir() -> Path:
    """`$CLIPFORGE_CACHE/features` (default `~/.cache/clipforge/features`)."""
    from clipforge.checkpoints.registry import cache_dir

    return cache_dir() / "features"


def digest(description: dict[str, Any]) -> str:
    """SHA-256 of a JSON-able description (keys sorted, so dict order never matters)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


class FeatureCache:
    """Feature tensors on disk by description; `hits` and `misses` count this instance's look-ups."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get_or_compute(
        self, description: dict[str, Any], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The cached tensor for `description`, or `compute()`'s result, stored for next time."""
        path = self.path(digest(description))
        if path.is_file():
            self.hits += 1
            return load_file(path)["features"]
        self.misses += 1
        features = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        metadata = {"description": json.dumps(description, sort_keys=True)[:65536]}
        save_file({"features": features.contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
        return features


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content (remembered per path, size and modification time in this process)."""
    stat = os.stat(path)
    return _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def model_fingerprint(name_or_path: str | os.PathLike[str]) -> str:
    """A content hash of the weights `clipforge.load(name_or_path)` reads (downloading a named release)."""
    from clipforge.checkpoints import native, resolve

    config, path = resolve(name_or_path)
    if path.is_dir():
        files = [path / native.CONFIG_FILE, path / native.WEIGHTS_FILE]
        parts = {f.name: file_sha256(f) for f in files}
    else:
        parts = {"weights": file_sha256(path)}
    if config is not None:
        parts["config"] = json.dumps(config.to_dict(), sort_keys=True)
    return digest(parts)


def images_fingerprint(images: Sequence[ImageRef]) -> str:
    """A hash of which bytes `images` name: every (file, offset, size), and each file's size and mtime."""
    h = hashlib.sha256()
    stats: dict[str, tuple[int, int]] = {}
    for ref in images:
        if ref.path not in stats:
            stat = os.stat(ref.path)
            stats[ref.path] = (stat.st_size, stat.st_mtime_ns)
        h.update(f"{os.path.abspath(ref.path)}\0{ref.offset}\0{ref.size}\0{stats[ref.path]}\n".encode())
    return h.hexdigest()
