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


def get_tokenizer(path: str | os.PathLike[str] | None = None) -> ClipTokenizer:
    """OpenAI's tokenizer (`path` None or "openai"), or the one saved in directory `path`.

    Building one takes ~0.1 s, so results are memoized per vocabulary; the tokenizer is safe to share.
    OpenAI's vocabulary file is looked up in `$CLIPFORGE_BPE_PATH`, then `$CLIPFORGE_CACHE` (default
    `~/.cache/clipforge`), and downloaded there (SHA-256 checked) if missing.
    """
    if path is None or str(path) == "openai":
        return _openai_tokenizer(openai_bpe_path(), 77)
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved tokenizer: no {CONFIG_FILE}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != "clipforge-clip-bpe":
        raise ValueError(f"{config_path}: unknown tokenizer format {config.get('format')!r}")
    context_length = int(config.get("context_length", 77))
    if config["vocab"] == "openai":
        return _openai_tokenizer(openai_bpe_path(), context_length)
    merges_path = (directory / MERGES_FILE).resolve()
    return _trained_tokenizer(merges_path, merges_path.stat().st_mtime_ns, context_length)


@functools.lru_cache(maxsize=4)
def _openai_tokenizer(bpe_path: Path, context_length: int) -> ClipTokenizer:
    return ClipTokenizer(load_openai_merges(bpe_path), name="openai", context_length=context_length)


@functools.lru_cache(maxsize=8)
def _trained_tokenizer(merges_path: Path, mtime_ns: int, context_length: int) -> ClipTokenizer:
    # mtime is part of the key so a tokenizer re-saved to the same directory is reloaded
    return ClipTokenizer(read_merges(merges_path), name="trained", context_length=context_length)
