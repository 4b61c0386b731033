"""Pretrained weights by name: URLs, SHA-256 digests and architectures.

OpenAI's nine released CLIP models: the URLs are the ones OpenAI publishes (github.com/openai/CLIP,
`clip/clip.py`, `_MODELS`); the digest of each file is the second-to-last segment of its URL.

OpenCLIP's weights are named "openclip/<architecture>:<tag>" after OpenCLIP's own (architecture, tag)
pairs (github.com/mlfoundations/open_clip, src/open_clip/pretrained.py). OpenCLIP publishes no full digest
for them (its GitHub-release files carry an 8-hex-digit prefix, its Hugging Face Hub files none), so only
files whose full SHA-256 could be attributed to a published source are registered, each pinned to a Hub
revision so the bytes cannot change under the digest; see each entry's comment.

Files are downloaded once into the cache directory (`$CLIPFORGE_CACHE`, default `~/.cache/clipforge`),
checked against the digest, and reused afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.models.config import ALIASES

_BASE = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class PretrainedWeights:
    url: str
    sha256: str
    architecture: str = ""  # a name in MODEL_CONFIGS; "": the same as the weights' name
    cache_name: str = ""  # the file's name in the cache; "": the URL's last segment
    preprocess: dict[str, tuple[float, float, float]] | None = None  # {"mean", "std"} when not OpenAI's

    @property
    def filename(self) -> str:
        return self.cache_name or self.url.rsplit("/", 1)[-1]


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


_HF = "https://huggingface.co"

# Keys: "openclip/<OpenCLIP architecture>:<OpenCLIP tag>".
OPENCLIP_PRETRAINED: dict[str, PretrainedWeights] = {
    # laion/CLIP-ViT-B-32-laion2B-s34B-b79K, the Hub file OpenCLIP's "laion2b_s34b_b79k" loads
    # (605,143,316 bytes). Digest: the one two independent public projects pin for this file at this
    # revision (found by searching public source code); OpenCLIP publishes none.
    "openclip/ViT-B-32:laion2b_s34b_b79k": PretrainedWeights(
        f"{_HF}/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/1a25a446712ba5ee05982a381eed697ef9b435cf/"
        "open_clip_model.safetensors",
        "ac4f8c4b88af6d963118cbf40ad93176d092abbedfcb752601ae1866352656e6",
        architecture="openclip/ViT-B-32",
        cache_name="openclip-ViT-B-32-laion2b_s34b_b79k.safetensors",
    ),
    # laion/CLIP-ViT-L-14-laion2B-s32B-b82K, open_clip_pytorch_model.safetensors (1,710,517,748 bytes), the
    # repository's safetensors weights for OpenCLIP's "laion2b_s32b_b82k". Digest, revision, file name and
    # size: pinned identically by three unrelated public projects found by searching public source code
    # (an OpenCLIP model installer with a size-and-digest table, a model-fetch script that checks the
    # digest after hf_hub_download at this revision, and a retrieval-asset preparation script that checks
    # the Hugging Face cache blob named by the digest). The size is that of an fp32 safetensors file of
    # the 427,616,513 parameters of "openclip/ViT-L-14". OpenCLIP normalizes this model's images with
    # mean = std = (0.5, 0.5, 0.5), not OpenAI's statistics (its pretrained list's "inception" norm).
    "openclip/ViT-L-14:laion2b_s32b_b82k": PretrainedWeights(
        f"{_HF}/laion/CLIP-ViT-L-14-laion2B-s32B-b82K/resolve/1627032197142fbe2a7cfec626f4ced3ae60d07a/"
        "open_clip_pytorch_model.safetensors",
        "7d129ed747e0ed53e82dfcc140382b51be66b56e6a9bdc3258afd2846e3bb019",
        architecture="openclip/ViT-L-14",
        cache_name="openclip-ViT-L-14-laion2b_s32b_b82k.safetensors",
        preprocess={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    ),
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, open_clip_model.safetensors (3,944,517,836 bytes). Digest:
    # pinned with this revision and size by a public research project whose checks compare it with the
    # Hub's own LFS metadata for this revision, and listed as the OpenCLIP ViT-H-14 weights file by two
    # unrelated public model-hash lists, one naming this repository (all found by searching public source
    # code). The size is that of an fp32 safetensors file of the 986,109,441 parameters of
    # "openclip/ViT-H-14".
    "openclip/ViT-H-14:laion2b_s32b_b79k": PretrainedWeights(
        f"{_HF}/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/1c2b8495b28150b8a4922ee1c8edee224c284c0c/"
        "open_clip_model.safetensors",
        "0084e75319a50ad85ef45377bad5bc38f2f58824459eb690048d51c9f8863be5",
        architecture="openclip/ViT-H-14",
        cache_name="openclip-ViT-H-14-laion2b_s32b_b79k.safetensors",
    ),
}


def _all() -> dict[str, PretrainedWeights]:
    return {**PRETRAINED, **OPENCLIP_PRETRAINED}


def available_pretrained() -> list[str]:
    """Names with downloadable weights (OpenAI's spellings like "ViT-B/32" are accepted too)."""
    return list(_all())


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def has_pretrained(name: str) -> bool:
    return canonical_name(name) in _all()


def registered_name(name_or_path: Any, pretrained: Any = None) -> str | None:
    """The registry's name for what `load(name_or_path, pretrained)` downloads, or None for local files.

    `pretrained` may be an OpenCLIP tag beside an OpenCLIP architecture ("openclip/ViT-B-32",
    "laion2b_s34b_b79k" names "openclip/ViT-B-32:laion2b_s34b_b79k")."""
    if not isinstance(name_or_path, str):
        return None
    if isinstance(pretrained, str) and has_pretrained(f"{name_or_path}:{pretrained}"):
        return f"{name_or_path}:{pretrained}"
    if pretrained in (None, "openai") and has_pretrained(name_or_path):
        return name_or_path
    return None


def get_pretrained(name: str) -> PretrainedWeights:
    key, known = canonical_name(name), _all()
    if key not in known:
        raise CheckpointError(f"no pretrained weights named {name!r}; available: {', '.join(known)}")
    return known[key]


def architecture(name: str) -> str:
    """The architecture (a MODEL_CONFIGS name) of the named weights."""
    return get_pretrained(name).architecture or canonical_name(name)


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
