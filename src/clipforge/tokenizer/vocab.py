"""The BPE vocabulary: byte-to-unicode map, merges files, and where OpenAI's vocabulary file comes from.

A CLIP vocabulary is fully determined by its ordered merge list: ids 0-255 are the 256 byte symbols (in
the byte-to-unicode map's order), 256-511 the same symbols with the end-of-word marker `</w>`, then one id
per merge (the concatenated pair), then `<|startoftext|>` and `<|endoftext|>`. OpenAI's vocabulary is the
first 48,894 merges of `bpe_simple_vocab_16e6.txt.gz`, giving 49,408 ids. That file is OpenAI's and is never
copied into this repository or into saved models: it is found locally or downloaded (see `openai_bpe_path`).
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

from clipforge.download import download, sha256_file

__all__ = [
    "END_OF_WORD",
    "EOT",
    "OPENAI_BPE_FILENAME",
    "OPENAI_BPE_SHA256",
    "OPENAI_BPE_URL",
    "OPENAI_NUM_MERGES",
    "SOT",
    "build_vocab",
    "bytes_to_unicode",
    "find_openai_bpe",
    "load_openai_merges",
    "openai_bpe_path",
    "read_merges",
    "write_merges",
]

END_OF_WORD = "</w>"
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"

OPENAI_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_BPE_URL = "https://openaipublic.azureedge.net/clip/bpe_simple_vocab_16e6.txt.gz"
OPENAI_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# 49408 ids = 512 byte symbols + 48894 merges + 2 special tokens.
OPENAI_NUM_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in its order (printable bytes keep their char).

    The dict's order is the order of the first 256 vocabulary ids; id 0 is "!" (byte 33), which is why the
    padding id 0 decodes to "!".
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)  # the unprintable bytes move up past Latin-1, in byte order
            extra += 1
    return mapping


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id for a merge list, the specials last. A merge whose result already has an id (the
    `tokenizers` trainer can reach one token through two pairs) gets no second id, so ids stay contiguous."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate([*symbols, *(s + END_OF_WORD for s in symbols)])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[SOT] = len(vocab)
    vocab[EOT] = len(vocab)
    return vocab


def read_merges(path: str | os.PathLike[str], limit: int | None = None) -> list[tuple[str, str]]:
    """Merges from a merges file (optionally gzipped): one `a b` pair a line after a header line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]  # line 0 is a header, as in OpenAI's file
    if limit is not None:
        if len(lines) < limit:
            raise ValueError(f"{path}: {len(lines)} merge lines, expected at least {limit}")
        lines = lines[:limit]
    merges = [tuple(line.split()) for line in lines if line]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: every line after the header must be two space-separated symbols")
    return merges  # type: ignore[return-value]


def write_merges(merges: list[tuple[str, str]], path: str | os.PathLike[str]) -> None:
    """Write a merges file in the same format OpenAI's uses (a header line, then `a b` per line)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2 (clipforge)\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


def _cache_dir() -> Path:
    return Path(os.environ.get("CLIPFORGE_CACHE") or Path.home() / ".cache" / "clipforge")


def find_openai_bpe() -> Path | None:
    """OpenAI's vocabulary file if it is already on this machine (`$CLIPFORGE_BPE_PATH`, then the cache
    directory), else None. Never downloads: tests use this to skip where the file is absent."""
    env = os.environ.get("CLIPFORGE_BPE_PATH")
    if env:
        return Path(env) if Path(env).is_file() else None
    cached = _cache_dir() / OPENAI_BPE_FILENAME
    return cached if cached.is_file() else None


def openai_bpe_path(download_missing: bool = True) -> Path:
    """Path to OpenAI's vocabulary file, verified by SHA-256.

    Order: `$CLIPFORGE_BPE_PATH` (must exist if set), then `$CLIPFORGE_CACHE` or `~/.cache/clipforge`, then a
    download from OpenAI's published URL into that cache directory.
    """
    env = os.environ.get("CLIPFORGE_BPE_PATH")
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"CLIPFORGE_BPE_PATH={env} does not exist")
    else:
        path = _cache_dir() / OPENAI_BPE_FILENAME
        if not path.is_file():
            if not download_missing:
                raise FileNotFoundError(
                    f"{OPENAI_BPE_FILENAME} not found in {path.parent}; set CLIPFORGE_BPE_PATH"
                )
            return download(OPENAI_BPE_URL, path, OPENAI_BPE_SHA256)
    _check_openai_file(path)
    return path


@functools.lru_cache(maxsize=8)
def _check_openai_file(path: Path) -> None:
    # A different file here would silently give different ids under the name "openai"; hashing 1.3 MB is ms.
    actual = sha256_file(path)
    if actual != OPENAI_BPE_SHA256:
        raise ValueError(f"{path} is not OpenAI's {OPENAI_BPE_FILENAME}: SHA-256 {actual}")


def load_openai_merges(path: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """OpenAI's 48,894 merges (lines 1..48894 after the header) from `path` or `openai_bpe_path()`."""
    return read_merges(path or openai_bpe_path(), limit=OPENAI_NUM_MERGES)
