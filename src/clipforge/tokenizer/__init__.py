"""CLIP's tokenizer: OpenAI's exact byte-level BPE (49,408 ids), fast, plus training your own.

    from clipforge.tokenizer import get_tokenizer
    tok = get_tokenizer()                       # OpenAI's vocabulary
    tok(["a photo of a cat"])                   # LongTensor [1, 77], like clip.tokenize
    tok.decode(tok.encode("a photo of a cat"))  # 'a photo of a cat '

See docs/tokenizer.md.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from clipforge.tokenizer.cleaning import clean_text, is_fast_text, pretokenize
from clipforge.tokenizer.core import CONFIG_FILE, MERGES_FILE, ClipTokenizer
from clipforge.tokenizer.train import train_tokenizer
from clipforge.tokenizer.vocab import find_openai_bpe, load_openai_merges, openai_bpe_path, read_merges

__all__ = [
    "ClipTokenizer",
    "clean_text",
    "find_openai_bpe",
    "get_tokenizer",
    "is_fast_text",
    "openai_bpe_path",
    "pretokenize",
    "train_tokenizer",
]


# A saved tokenizer's files are read only below these sizes (its config is ~300 bytes; a merges file
# ~10-20 bytes a merge, and ids stay below 2**20); contexts are bounded so a typo cannot ask for gigabytes.
MAX_CONFIG_BYTES = 1 << 16
MAX_MERGES_BYTES = 64 << 20
MAX_CONTEXT_LENGTH = 1 << 16
FORMAT = "clipforge-clip-bpe"


def get_tokenizer(
    path: str | os.PathLike[str] | None = None, context_length: int | None = None
) -> ClipTokenizer:
    """OpenAI's tokenizer (`path` None or "openai"), or the one saved in directory `path`.

    `context_length` is the default length of the token tensors it returns (None: the saved tokenizer's,
    77 for OpenAI's); `clipforge.load` passes the model's. Building one takes ~0.1 s, so results are
    memoized per vocabulary and length; the tokenizer is safe to share. OpenAI's vocabulary file is looked
    up in `$CLIPFORGE_BPE_PATH`, then `$CLIPFORGE_CACHE` (default `~/.cache/clipforge`), and downloaded
    there (SHA-256 checked) if missing.
    """
    if context_length is not None:
        _check_context_length(context_length, "context_length")
    if path is None or str(path) == "openai":
        return _openai_tokenizer(openai_bpe_path(), context_length or 77)
    directory = Path(path)
    config = _read_config(directory)
    length = context_length or config.get("context_length", 77)
    if config["vocab"] == "openai":
        return _openai_tokenizer(openai_bpe_path(), length)
    merges_path = (directory / MERGES_FILE).resolve()
    if not merges_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved tokenizer: no {MERGES_FILE}")
    if merges_path.stat().st_size > MAX_MERGES_BYTES:
        raise ValueError(f"{directory / MERGES_FILE} is over {MAX_MERGES_BYTES:,} bytes: not a merges file")
    return _trained_tokenizer(merges_path, merges_path.stat().st_mtime_ns, length)


def _check_context_length(value: object, where: str) -> None:
    if type(value) is not int or not 2 <= value <= MAX_CONTEXT_LENGTH:
        raise ValueError(f"{where} must be an integer from 2 to {MAX_CONTEXT_LENGTH:,}, got {value!r}")


def _read_config(directory: Path) -> dict:
    """The saved tokenizer's config, checked: its format, its vocabulary's kind, its context length."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved tokenizer: no {CONFIG_FILE}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is over {MAX_CONFIG_BYTES:,} bytes: not a tokenizer config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        shown = config.get("format") if isinstance(config, dict) else config
        raise ValueError(f"{path}: unknown tokenizer format {shown!r}")
    if config.get("vocab") not in ("openai", MERGES_FILE):
        raise ValueError(
            f'{path}: field \'vocab\' must be "openai" or "{MERGES_FILE}", got {config.get("vocab")!r}'
        )
    if "context_length" in config:
        _check_context_length(config["context_length"], f"{path}: field 'context_length'")
    return config


@functools.lru_cache(maxsize=4)
def _openai_tokenizer(bpe_path: Path, context_length: int) -> ClipTokenizer:
    return ClipTokenizer(load_openai_merges(bpe_path), name="openai", context_length=context_length)


@functools.lru_cache(maxsize=8)
def _trained_tokenizer(merges_path: Path, mtime_ns: int, context_length: int) -> ClipTokenizer:
    # mtime is part of the key so a tokenizer re-saved to the same directory is reloaded
    return ClipTokenizer(read_merges(merges_path), name="trained", context_length=context_length)
