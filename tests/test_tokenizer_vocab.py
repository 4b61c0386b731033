"""Where OpenAI's vocabulary file comes from: $CLIPFORGE_BPE_PATH, the cache directory, or a download."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipforge.tokenizer import vocab
from clipforge.tokenizer.vocab import (
    OPENAI_BPE_FILENAME,
    OPENAI_NUM_MERGES,
    build_vocab,
    bytes_to_unicode,
    find_openai_bpe,
    load_openai_merges,
    openai_bpe_path,
    read_merges,
)

REAL = find_openai_bpe()
needs_vocab = pytest.mark.needs_openai_bpe  # conftest.py: skips without the file, fails without it in CI


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CLIPFORGE_BPE_PATH, and an empty cache directory."""
    monkeypatch.delenv("CLIPFORGE_BPE_PATH", raising=False)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_env_path_that_does_not_exist_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPFORGE_BPE_PATH", str(tmp_path / "nope.txt.gz"))
    assert find_openai_bpe() is None
    with pytest.raises(FileNotFoundError, match="CLIPFORGE_BPE_PATH"):
        openai_bpe_path()


def test_missing_without_download(clean_env: Path) -> None:
    assert find_openai_bpe() is None
    with pytest.raises(FileNotFoundError):
        openai_bpe_path(download_missing=False)


def test_a_different_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / OPENAI_BPE_FILENAME
    with gzip.open(fake, "wt") as f:
        f.write("#version\na b\n")
    monkeypatch.setenv("CLIPFORGE_BPE_PATH", str(fake))
    with pytest.raises(ValueError, match="not OpenAI's"):
        openai_bpe_path()


@needs_vocab
def test_env_then_cache_then_download(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert REAL is not None
    # Download: from a file:// URL standing in for OpenAI's, into the cache directory, checksum verified.
    monkeypatch.setattr(vocab, "OPENAI_BPE_URL", REAL.resolve().as_uri())
    assert openai_bpe_path() == clean_env / OPENAI_BPE_FILENAME
    # Cache: found there now, without the URL.
    monkeypatch.setattr(vocab, "OPENAI_BPE_URL", "http://127.0.0.1:9/unreachable")
    assert find_openai_bpe() == openai_bpe_path() == clean_env / OPENAI_BPE_FILENAME
    # The environment variable wins over the cache.
    elsewhere = clean_env.parent / "elsewhere.txt.gz"
    shutil.copy(REAL, elsewhere)
    monkeypatch.setenv("CLIPFORGE_BPE_PATH", str(elsewhere))
    assert find_openai_bpe() == openai_bpe_path() == elsewhere


@needs_vocab
def test_openai_vocabulary_layout() -> None:
    merges = load_openai_merges(REAL)
    assert len(merges) == OPENAI_NUM_MERGES == 48894
    ids = build_vocab(merges)
    assert len(ids) == 49408 and ids["<|startoftext|>"] == 49406 and ids["<|endoftext|>"] == 49407
    symbols = list(bytes_to_unicode().values())
    assert [ids[s] for s in symbols] == list(range(256))
    assert [ids[s + "</w>"] for s in symbols] == list(range(256, 512))
    assert ids["".join(merges[0])] == 512 and ids["".join(merges[-1])] == 49405


def test_bytes_to_unicode_is_gpt2s() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert mapping[ord("a")] == "a" and mapping[ord(" ")] == "Ġ" and mapping[0] == "Ā"
    assert next(iter(mapping.values())) == "!"


def test_read_merges_formats(tmp_path: Path) -> None:
    path = tmp_path / "merges.txt"
    path.write_text("#header\na b\nab c</w>\n", encoding="utf-8")
    assert read_merges(path) == [("a", "b"), ("ab", "c</w>")]
    assert read_merges(path, limit=1) == [("a", "b")]
    path.write_text("#header\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="two space-separated"):
        read_merges(path)


NEEDS_BPE_TEST = """
import pytest

@pytest.mark.needs_openai_bpe
def test_uses_the_vocabulary():
    pass
"""


@pytest.mark.parametrize(
    ("env", "outcome"),
    [
        ({}, "1 skipped"),
        ({"CI": "true"}, "1 error"),
        ({"CLIPFORGE_REQUIRE_BPE": "1"}, "1 error"),
        ({"CI": "true", "CLIPFORGE_BPE_PATH": "present"}, "1 passed"),
    ],
)
def test_missing_vocabulary_skips_locally_and_fails_in_ci(tmp_path: Path, env: dict, outcome: str) -> None:
    # A separate pytest run with this suite's conftest.py as a plugin; the file is nowhere to be found,
    # except in the last case (where any file at $CLIPFORGE_BPE_PATH counts as found).
    (tmp_path / "test_inner.py").write_text(NEEDS_BPE_TEST)
    (tmp_path / "present").write_bytes(b"")
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "CLIPFORGE_REQUIRE_BPE")}
    base |= {"CLIPFORGE_BPE_PATH": "", "CLIPFORGE_CACHE": str(tmp_path / "cache")}
    base["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), base.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path, env=base | env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert outcome in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == (1 if "error" in outcome else 0)
    if "error" in outcome:  # a failure at setup: reported as an error, and the run fails
        assert "bpe_simple_vocab_16e6.txt.gz not found" in proc.stdout
