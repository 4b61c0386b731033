"""Pretrained weights by name: OpenAI's nine released CLIP models, their URLs and SHA-256 digests.

The URLs are the ones OpenAI publishes (github.com/openai/CLIP, `clip/clip.py`, `_MODELS`); the digest of
each file is the second-to-last segment of its URL. Files are downloaded once into the cache directory
(`$CLIPFORGE_CACHE`, default `~/.cache/clipforge`), checked against the digest, and reused afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.models.config import ALIASES

_BASE = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class PretrainedWeights:
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _openai(sha256: str, filename: str) -> PretrainedWeights:
    return PretrainedWeights(f"{_BASE}/{sha256}/{filename}", sha256)


# Keys are architecture names of `clipforge.models.config.MODEL_CONFIGS`.
PRETRAINED: dict[str, PretrainedWeights] = {
    "RN50": _openai("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": _openai("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": _openai("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": _openai("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": _openai("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B-32": _openai("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B-16": _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L-14": _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L-14-336": _openai(
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"
    ),
}


def available_pretrained() -> list[str]:
    """Names with downloadable weights (OpenAI's spellings like "ViT-B/32" are accepted too)."""
    return list(PRETRAINED)


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def has_pretrained(name: str) -> bool:
    return canonical_name(name) in PRETRAINED


def get_pretrained(name: str) -> PretrainedWeights:
    key = canonical_name(name)
    if key not in PRETRAINED:
        raise CheckpointError(f"no pretrained weights named {name!r}; available: {', '.join(PRETRAINED)}")
    return PRETRAINED[key]


def cache_dir() -> Path:
    """Where downloads go: `$CLIPFORGE_CACHE`, default `~/.cache/clipforge`."""
    return Path(os.environ.get("CLIPFORGE_CACHE") or Path.home() / ".cache" / "clipforge")


def fetch(name: str) -> Path:
    """The local path of a pretrained file in the cache, downloaded if missing.

    `clipforge.download` checks the SHA-256 of a cached file too (and downloads it again on a mismatch);
    a fresh download gets its final name only once its digest matched.
    """
    from clipforge.download import download

    weights = get_pretrained(name)
    return download(weights.url, cache_dir() / "weights" / weights.filename, weights.sha256)
