"""Pretrained names: the registry, and download -> cache -> load against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import re
from types import SimpleNamespace

import pytest
import torch

import clipforge.tokenizer
from clipforge.checkpoints import (
    PRETRAINED,
    CheckpointError,
    available_pretrained,
    load,
    load_model,
    registry,
)
from clipforge.download import ChecksumError
from clipforge.models import create_model
from clipforge.models.config import MODEL_CONFIGS, PAPER_MODELS

OPENAI = r"https://openaipublic\.azureedge\.net/clip/models"


def test_the_nine_released_models():
    assert available_pretrained()[: len(PAPER_MODELS)] == list(PAPER_MODELS)  # then OpenCLIP's names
    for name, weights in PRETRAINED.items():
        assert name in MODEL_CONFIGS
        match = re.fullmatch(
            r"https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/([\w.-]+\.pt)", weights.url
        )
        assert match, weights.url
        assert match.group(1) == weights.sha256  # OpenAI's convention: the digest is in the URL
    assert PRETRAINED["ViT-L-14-336"].filename == "ViT-L-14-336px.pt"


def test_openai_spellings_are_accepted():
    for alias, name in [("ViT-B/32", "ViT-B-32"), ("ViT-L/14@336px", "ViT-L-14-336")]:
        assert registry.get_pretrained(alias) == PRETRAINED[name]


def test_unknown_names_list_what_is_available():
    with pytest.raises(CheckpointError, match="ViT-B-32") as err:
        load_model("ViT-Z-99")
    assert "RN50x64" in str(err.value)
    with pytest.raises(CheckpointError, match="without released weights"):
        load_model("ViT-Nano-16-64")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_model("ViT-Z-99", pretrained="weights.pt")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("CLIPFORGE_CACHE", str(path))
    return path


def _publish(file_server, name: str = "ViT-Nano-16-64") -> tuple[torch.nn.Module, str, str]:
    """A tiny model in OpenAI's layout (fp16 + extras) on the server: (model, url, sha256)."""
    base, root, _ = file_server
    torch.manual_seed(0)
    model = create_model(name).eval()
    extras = {"input_resolution": torch.tensor(64), "context_length": torch.tensor(77)}
    torch.save({**{k: v.half() for k, v in model.state_dict().items()}, **extras}, root / "tiny.pt")
    return model, f"{base}/tiny.pt", hashlib.sha256((root / "tiny.pt").read_bytes()).hexdigest()


def test_download_then_load_then_reuse_the_cache(file_server, cache, monkeypatch):
    model, url, sha = _publish(file_server)
    monkeypatch.setitem(PRETRAINED, "ViT-Nano-16-64", registry.PretrainedWeights(url, sha))

    def stub_tokenizer(path=None, context_length=None):  # OpenAI's vocabulary is not needed here
        return SimpleNamespace(vocab_size=49408, path=path, context_length=context_length)

    monkeypatch.setattr(clipforge.tokenizer, "get_tokenizer", stub_tokenizer)

    loaded, preprocess, tokenizer = load("ViT-Nano-16-64")
    assert (cache / "weights" / "tiny.pt").is_file()
    assert (tokenizer.path, tokenizer.context_length) == (None, 77) and callable(preprocess)
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, model.state_dict()[key].half().float()), key

    file_server[2].shutdown()  # no network now: the verified cached file is used
    assert torch.equal(load_model("ViT-Nano-16-64").logit_scale, loaded.logit_scale)


def test_bad_checksum_keeps_nothing(file_server, cache, monkeypatch):
    _, url, _ = _publish(file_server)
    monkeypatch.setitem(PRETRAINED, "ViT-Nano-16-64", registry.PretrainedWeights(url, "0" * 64))
    with pytest.raises(ChecksumError, match="0" * 64):
        load_model("ViT-Nano-16-64")
    assert not any(p.is_file() for p in cache.rglob("*"))  # no partial or unverified file


def test_missing_file_on_the_server_is_an_error(file_server, cache, monkeypatch):
    base, _, _ = file_server
    monkeypatch.setitem(PRETRAINED, "ViT-Nano-16-64", registry.PretrainedWeights(f"{base}/nope.pt", "0" * 64))
    with pytest.raises(OSError, match="404"):
        load_model("ViT-Nano-16-64")


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("CLIPFORGE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path / ".cache" / "clipforge"


def test_every_openclip_name_is_well_formed():
    """Each OpenCLIP name: a Hub file pinned to a commit, a full digest, a GELU architecture, its own cache
    file."""
    names = registry.OPENCLIP_PRETRAINED
    assert "openclip/ViT-B-32:laion2b_s34b_b79k" in names
    assert set(names) <= set(available_pretrained())
    for name, weights in names.items():
        arch, tag = name.split(":")
        assert weights.architecture == arch and registry.architecture(name) == arch
        assert re.fullmatch(r"[a-z0-9_]+", tag), name  # OpenCLIP's tags are lower case
        match = re.fullmatch(
            r"https://huggingface\.co/([\w.-]+/[\w.-]+)/resolve/([0-9a-f]{40})/([\w.-]+\.safetensors)",
            weights.url,
        )
        assert match, weights.url  # pinned to a 40-hex commit, never a branch like "main"
        # the Hub repository of that architecture (catches an entry pasted under the wrong name)
        assert f"/CLIP-{arch.removeprefix('openclip/')}-" in match.group(1), name
        assert re.fullmatch(r"[0-9a-f]{64}", weights.sha256), name  # full lowercase SHA-256
        config = MODEL_CONFIGS[arch]  # a registered architecture
        # OpenCLIP's LAION / DataComp weights use exact GELU unless the architecture says otherwise.
        assert config.activation == ("quick_gelu" if arch.endswith("-quickgelu") else "gelu"), name
        assert weights.filename.endswith(".safetensors") and weights.filename.startswith("openclip-")
    cache_names = [w.filename for w in names.values()]
    assert len(set(cache_names)) == len(cache_names)  # no two names share a cache file
    assert not set(cache_names) & {w.filename for w in PRETRAINED.values()}
    digests = [w.sha256 for w in names.values()]
    assert len(set(digests)) == len(digests)  # no digest copied onto a second name
