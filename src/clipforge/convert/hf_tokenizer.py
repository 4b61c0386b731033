"""The tokenizer files of a transformers CLIP directory (`vocab.json` + `merges.txt` + their configs).

A CLIP vocabulary is its ordered merge list (see `tokenizer/vocab.py`): `vocab.json` must be exactly the
vocabulary the merges build, or its ids are not ones clipforge's tokenizer can give. Written files make
transformers' `CLIPTokenizer` give clipforge's ids for the same text, except where clipforge (like OpenAI's
code) cleans text with ftfy and html.unescape and transformers does not: see docs/interop-hf.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipforge.checkpoints.fit import check_tokenizer_fits
from clipforge.checkpoints.native import inside
from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.models.config import CLIPConfig
from clipforge.tokenizer import MAX_MERGES_BYTES
from clipforge.tokenizer.core import ClipTokenizer
from clipforge.tokenizer.vocab import EOT, SOT, build_vocab

__all__ = ["MERGES_FILE", "OPENAI_MERGES_SHA256", "VOCAB_FILE", "read_tokenizer", "tokenizer_files"]

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# `ClipTokenizer.merges_sha256` of OpenAI's 48,894 merges: a directory holding them gets the tokenizer
# named "openai", which clipforge saves by name instead of copying the vocabulary.
OPENAI_MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"
# transformers' CLIPModel reads the pre-fix configs' eos_token_id 2 as "pool at the argmax of the ids".
LEGACY_EOS_ID = 2


def read_tokenizer(directory: Path, config: CLIPConfig, text_config: Any) -> ClipTokenizer | None:
    """The directory's tokenizer as a `ClipTokenizer` at the model's context length; None without
    `vocab.json` and `merges.txt`. Refused, naming the file, if the two disagree, if the model cannot embed
    its ids, or if the config pools the text at another token than its end token."""
    vocab_path = inside(directory, VOCAB_FILE, "the vocabulary")
    merges_path = inside(directory, MERGES_FILE, "the merges file")
    present = [p.is_file() for p in (vocab_path, merges_path)]
    if not any(present):
        return None
    if not all(present):
        absent = MERGES_FILE if present[0] else VOCAB_FILE
        raise CheckpointError(
            f"{directory}: a tokenizer needs both {VOCAB_FILE} and {MERGES_FILE}; {absent} is absent"
        )
    merges = _read_merges(merges_path)
    built = build_vocab(merges)
    if len(built) > config.text.vocab_size:
        raise CheckpointError(
            f"{merges_path}: its {len(built):,} tokens do not fit the model's {config.text.vocab_size:,} "
            "(text_config.vocab_size)"
        )
    _check_vocab(vocab_path, _read_small(vocab_path), built)
    tokenizer = ClipTokenizer(merges, name="trained", context_length=config.text.context_length)
    if tokenizer.merges_sha256 == OPENAI_MERGES_SHA256:
        tokenizer = ClipTokenizer(merges, name="openai", context_length=config.text.context_length)
    check_tokenizer_fits(config, tokenizer, directory)
    eos = text_config.get("eos_token_id") if isinstance(text_config, dict) else None
    if type(eos) is int and eos not in (LEGACY_EOS_ID, tokenizer.eot_token_id):
        raise CheckpointError(
            f"{directory / 'config.json'}: field 'text_config.eos_token_id' is {eos}, not the tokenizer's "
            f"{EOT} ({tokenizer.eot_token_id}): the model would read texts at another token than clipforge"
        )
    return tokenizer


def _read_small(path: Path) -> Any:
    if path.stat().st_size > MAX_MERGES_BYTES:
        raise CheckpointError(f"{path} is over {MAX_MERGES_BYTES:,} bytes: not a CLIP tokenizer file")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else text
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = _read_small(path).split("\n")
    if lines and lines[0].startswith("#version"):  # the header line
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line:
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise CheckpointError(f"{path}: line {number} is {line[:40]!r}, not two space-separated symbols")
        merges.append((pair[0], pair[1]))
    return merges


def _check_vocab(path: Path, vocab: Any, built: dict[str, int]) -> None:
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{path}: not a JSON object of token -> id")
    for token, i in built.items():
        if vocab.get(token) != i:
            raise CheckpointError(
                f"{path}: token {token!r} has id {vocab.get(token)!r}, where {MERGES_FILE} gives {i}: not "
                "the byte-level CLIP vocabulary of its merges"
            )
    extra = [t for t in vocab if t not in built]
    if extra:
        raise CheckpointError(f"{path}: token {extra[0]!r} is not in the vocabulary of {MERGES_FILE}")


def tokenizer_files(tokenizer: ClipTokenizer, context_length: int) -> dict[str, str | dict[str, Any]]:
    """File name -> content (text, or a JSON object) of the files transformers' CLIPTokenizer reads.

    Padding is the end token, transformers' convention for CLIP (clipforge pads with 0): the model reads
    each text at its first end token, and a causal mask keeps later tokens from mattering. A pad token
    of "!" (id 0) would match clipforge's padding, but transformers matches special tokens in the text
    itself, so every "!" in a caption would become a token of its own."""
    merges = "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    return {
        VOCAB_FILE: build_vocab(tokenizer.merges),
        MERGES_FILE: "#version: 0.2\n" + merges,
        "tokenizer_config.json": {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": context_length,
            "clean_up_tokenization_spaces": False,
            **special,
        },
        "special_tokens_map.json": special,
    }
