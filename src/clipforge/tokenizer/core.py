"""`ClipTokenizer`: OpenAI CLIP's tokenization, bit for bit, with the BPE in Rust (`tokenizers`).

The hot path for a batch of 256 texts or more: one scan of the batch's bytes finds the few texts that
need cleaning (`cleaning.is_fast_text` says which), and only those are cleaned; Arrow lowercases and splits
the batch on whitespace and finds its distinct chunks; the chunk cache gives their ids (regex and BPE run
only for chunks never seen, the regex in Arrow too, all their words in one flat list); one C-level join
gives the ids of the batch, and numpy scatters them into the [N, context_length] tensor. Python works per
distinct chunk, never per chunk or per token, and per text only for the texts that need cleaning. Smaller
batches take a plain-Python path over the same caches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from itertools import chain, compress
from operator import attrgetter, not_
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tokenizers import models

from clipforge.tokenizer.chunks import (
    ID_LIMIT,
    SEPARATOR,
    IdCache,
    distinct,
    gather_ids,
    id_chars,
    ids_of_chars,
    index_dtype,
)
from clipforge.tokenizer.cleaning import (
    CHUNK_END,
    WORD_RE,
    ascii_words,
    clean_text,
    is_fast_text,
    slow_texts,
)
from clipforge.tokenizer.vocab import (
    END_OF_WORD,
    EOT,
    SOT,
    build_vocab,
    bytes_to_unicode,
    load_openai_merges,
    write_merges,
)

__all__ = ["CONFIG_FILE", "MERGES_FILE", "ClipTokenizer"]

CONFIG_FILE = "clipforge_tokenizer.json"
MERGES_FILE = "merges.txt"
FORMAT_VERSION = 1

_CLEAN_CACHE_SIZE = 1 << 16
# Batches this large go through Arrow; smaller ones through plain Python (`_encode_few`), which is faster
# below ~250 captions here (a training batch of 128: 3.8 against 4.9 us a caption). Tests run both paths.
ARROW_MIN_BATCH = 256


class ClipTokenizer:
    """Tokenizes like OpenAI's `clip.tokenize` / `SimpleTokenizer`, for any CLIP-style merge list.

    `tokenizer(texts, context_length=77, truncate=False)` -> LongTensor [N, context_length]: start token, ids,
    end token, zero padding. `encode`/`decode` match `SimpleTokenizer.encode`/`decode`.
    """

    def __init__(
        self,
        merges: list[tuple[str, str]],
        *,
        name: str = "trained",
        context_length: int = 77,
        cache_size: int = 1 << 18,
    ) -> None:
        self.name = name  # "openai" for OpenAI's vocabulary, else "trained"
        self.context_length = context_length
        self._merges = merges
        vocab = build_vocab(merges)
        self.vocab_size = len(vocab)
        if self.vocab_size > ID_LIMIT:
            raise ValueError(f"a vocabulary of {self.vocab_size} tokens is too large (max {ID_LIMIT})")
        self.sot_token_id = vocab[SOT]
        self.eot_token_id = vocab[EOT]
        self._bpe = _rust_bpe(vocab, merges)
        # The word cache starts with every printable-ASCII word that BPE turns into one whole-word token
        # (two new words in three in captions), so those never reach the BPE.
        whole = _whole_words(vocab, self._bpe)
        specials = {SOT: id_chars([self.sot_token_id]), EOT: id_chars([self.eot_token_id])}
        # The empty string (a split's edge) has no ids; CHUNK_END ends a chunk's words. Caches hold
        # ~100-120 bytes an entry: the default size holds ~60 MB (per DataLoader worker) before they empty.
        base = {"": "", CHUNK_END: SEPARATOR, **whole, **specials}
        self._words = IdCache(self._encode_words, cache_size, base=base)
        self._chunks = IdCache(self._encode_chunks, cache_size, base={"": ""})
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        # Each id's bytes, "</w>" kept as the 4 bytes it spells: decode replaces it after UTF-8 decoding,
        # like OpenAI's, so a literal "</w>" typed in a text also decodes to a space.
        self._id_bytes = [bytes(byte_of[c] for c in token) for token in vocab]
        self._cleaned: dict[str, str] = {}
        self._merges_sha256: str | None = None

    # ---- public API -------------------------------------------------------------------------------------

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False
    ) -> torch.Tensor:
        """LongTensor [N, context_length] of `texts` (a str is one text), as `clip.tokenize` gives.

        A text needing more than context_length - 2 ids raises ValueError unless `truncate`, which keeps the
        first context_length ids (start token included) and makes the last one the end token.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.context_length if context_length is None else context_length
        if length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {length}")
        ids, counts = self._encode_texts(texts)
        if not truncate:
            self._check_lengths(texts, counts, length)
        return torch.from_numpy(_pack(ids, counts, length, self.sot_token_id, self.eot_token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens (OpenAI's `SimpleTokenizer.encode`)."""
        return self._encode_texts([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (much faster than a loop)."""
        ids, counts = self._encode_texts(list(texts))
        return [part.tolist() for part in np.split(ids, np.cumsum(counts)[:-1])] if counts.size else []

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Text of token ids, exactly as OpenAI's `SimpleTokenizer.decode` (each `</w>` becomes a space)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor | np.ndarray) else list(ids)
        table = self._id_bytes
        if ids and (min(ids) < 0 or max(ids) >= len(table)):  # a negative index would silently wrap
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is not in the vocabulary (size {len(table)})")
        data = b"".join([table[i] for i in ids])
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    @property
    def identity(self) -> str:
        """Short name of the vocabulary: "openai", or "bpe-" and a hash of the merges for a trained one."""
        return "openai" if self.name == "openai" else f"bpe-{self.merges_sha256[:16]}"

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The ordered merge list that defines the vocabulary (a copy): what other formats write out."""
        return list(self._merges)

    @property
    def merges_sha256(self) -> str:
        if self._merges_sha256 is None:
            text = "\n".join(f"{a} {b}" for a, b in self._merges)
            self._merges_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._merges_sha256

    def to_dict(self) -> dict[str, Any]:
        """What a saved model records about its tokenizer (JSON-able; also the tokenizer dir's config)."""
        return {
            "format": "clipforge-clip-bpe",
            "format_version": FORMAT_VERSION,
            "vocab": "openai" if self.name == "openai" else MERGES_FILE,
            "identity": self.identity,
            "vocab_size": self.vocab_size,
            "num_merges": len(self._merges),
            "sot_token_id": self.sot_token_id,
            "eot_token_id": self.eot_token_id,
            "context_length": self.context_length,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer to `directory`; `get_tokenizer(directory)` loads it back.

        For OpenAI's vocabulary only the config is written: that vocabulary is not ours to redistribute,
        and loading finds it the usual way (CLIPFORGE_BPE_PATH, the cache, or a download).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.name != "openai":
            write_merges(self._merges, directory / MERGES_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return directory

    def __reduce__(self) -> tuple[Any, ...]:
        # DataLoader workers get a copy, rebuilt on arrival (the cache's lock and the Rust model do not
        # pickle). OpenAI's merges stay out of the pickle, like out of saved models: found again on load.
        if self.name == "openai":
            return (_restore_openai, (self.context_length, self._chunks.capacity))
        return (_restore, (self._merges, self.name, self.context_length, self._chunks.capacity))

    def __repr__(self) -> str:
        size, length = self.vocab_size, self.context_length
        return f"ClipTokenizer({self.identity}, vocab_size={size}, context_length={length})"

    # ---- internals --------------------------------------------------------------------------------------

    def _encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids of `texts` concatenated (uint32), and the number of ids of each text."""
        if set(map(type, texts)) - {str} and not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a sequence of str")
        if len(texts) < ARROW_MIN_BATCH:
            return self._encode_few(texts)
        # Lowercasing ASCII letters only is enough: cleaned texts are lowercase already, and fast ones ASCII.
        # Their only whitespace is ASCII, so the ASCII split splits like str.split().
        lowered = pc.ascii_lower(self._cleaned_texts(texts))
        chunks, which, per_text = distinct(pc.ascii_split_whitespace(lowered))
        return gather_ids(self._chunks.lookup(chunks), which, per_text)

    def _encode_few(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`_encode_texts` in plain Python, for small batches: each Arrow call has a fixed cost of tens of
        microseconds, which only large batches repay. The same steps, and the same caches."""
        chunks_of = [(t.lower() if is_fast_text(t) else self._clean(t)).split() for t in texts]
        chunks = list(dict.fromkeys(chain.from_iterable(chunks_of)))
        ids_of = dict(zip(chunks, self._chunks.lookup(chunks), strict=True))
        ids = ["".join(map(ids_of.__getitem__, c)) for c in chunks_of]
        return ids_of_chars("".join(ids)), np.fromiter(map(len, ids), np.int64, len(ids))

    def _cleaned_texts(self, texts: list[str]) -> pa.Array:
        """The texts after OpenAI's cleaning, except lowercasing and collapsing whitespace on fast ones."""
        try:
            array = pa.array(texts, pa.string())
        except UnicodeEncodeError:  # a lone surrogate is not UTF-8: clean text by text (ftfy replaces it)
            return pa.array([t if is_fast_text(t) else self._clean(t) for t in texts], pa.string())
        slow = slow_texts(array)
        if not slow.size:
            return array
        mask = np.zeros(len(texts), bool)
        mask[slow] = True
        cleaned = pa.array([self._clean(texts[i]) for i in slow.tolist()], pa.string())
        return pc.replace_with_mask(array, pa.array(mask), cleaned)

    def _clean(self, text: str) -> str:
        cleaned = self._cleaned.get(text)
        if cleaned is None:
            if len(self._cleaned) >= _CLEAN_CACHE_SIZE:
                self._cleaned.clear()
            cleaned = self._cleaned[text] = clean_text(text)
        return cleaned

    def _encode_chunks(self, chunks: list[str]) -> Iterable[tuple[str, str]]:
        """(chunk, its id characters) for chunks not cached yet.

        A chunk of ASCII letters is one word. Other ASCII chunks get their words from RE2
        (`ascii_words`), the rest (from texts that needed ftfy) from OpenAI's pattern itself. The word cache
        joins the ids of all their words in one call, and the chunks' ids are split apart at SEPARATOR.
        """
        if "".join(chunks).isascii():
            ascii_chunks, other = chunks, []
        else:
            is_ascii = list(map(str.isascii, chunks))
            ascii_chunks = list(compress(chunks, is_ascii))
            other = list(compress(chunks, map(not_, is_ascii)))
        is_word = list(map(str.isalpha, ascii_chunks))
        letters = list(compress(ascii_chunks, is_word))
        rest = list(compress(ascii_chunks, map(not_, is_word)))
        words = ascii_words(rest)
        words += [w for chunk in other for w in (*WORD_RE.findall(chunk), CHUNK_END)]
        ids = self._words.joined(words).split(SEPARATOR)
        ids.pop()  # after the last chunk's SEPARATOR
        letters_ids = self._words.lookup(letters)
        return chain(zip(letters, letters_ids, strict=True), zip(rest + other, ids, strict=True))

    def _encode_words(self, words: list[str]) -> dict[str, str]:
        """{word: its id characters} for words not cached yet, by the Rust BPE.

        One `tokenize` call per word: the whole `tokenizers.Tokenizer` pipeline costs more per word, even in
        batches. Most words never get here: see `_whole_words`.
        """
        # Usually every new word is printable ASCII, its own byte-level form: one check for all of them.
        if _is_byte_level("".join(words)):
            byte_level = words
        else:
            byte_level = [w if w.isascii() and w.isprintable() else _byte_chars(w) for w in words]
        tokenize, token_id = self._bpe.tokenize, attrgetter("id")
        return {
            w: "".join(map(chr, map(token_id, tokenize(b)))) for w, b in zip(words, byte_level, strict=True)
        }

    @staticmethod
    def _check_lengths(texts: list[str], counts: np.ndarray, length: int) -> None:
        too_long = np.flatnonzero(counts > length - 2)
        if too_long.size:
            i = int(too_long[0])
            shown = texts[i] if len(texts[i]) <= 80 else texts[i][:77] + "..."
            more = f" ({too_long.size - 1} more texts are too long too)" if too_long.size > 1 else ""
            raise ValueError(
                f"Input {shown!r} is too long for context length {length}: {int(counts[i])} tokens "
                f"+ start and end tokens > {length}; use truncate=True to cut it{more}"
            )


def _restore(merges: list[tuple[str, str]], name: str, context_length: int, cache_size: int) -> ClipTokenizer:
    return ClipTokenizer(merges, name=name, context_length=context_length, cache_size=cache_size)


def _restore_openai(context_length: int, cache_size: int) -> ClipTokenizer:
    merges = load_openai_merges()
    return ClipTokenizer(merges, name="openai", context_length=context_length, cache_size=cache_size)


# str.translate table from a byte (as the Latin-1 char of the same number) to its GPT-2 byte-level char.
_BYTE_CHARS = {b: c for b, c in bytes_to_unicode().items()}


def _is_byte_level(text: str) -> bool:
    """True if `text` is its own byte-level form: printable ASCII other than space maps to itself."""
    return text.isascii() and text.isprintable() and " " not in text


def _byte_chars(word: str) -> str:
    """The word's UTF-8 bytes as GPT-2 byte-level chars, the alphabet of the vocabulary."""
    if _is_byte_level(word):
        return word
    return word.encode("utf-8").decode("latin-1").translate(_BYTE_CHARS)


def _whole_words(vocab: dict[str, int], bpe: models.BPE) -> dict[str, str]:
    """printable-ASCII word -> its id as a character, for the words BPE turns into one whole-word token.

    A word whose `</w>` token exists is nearly always encoded as that token, but BPE may take another path
    through the merges and never reach it, so each is checked here, once per tokenizer (~0.1 s for OpenAI's
    vocabulary, where all 33,301 pass). Printable ASCII only: such a word is its own byte-level form.
    """
    whole = {}
    for token, i in vocab.items():
        word = token[: -len(END_OF_WORD)]
        if token.endswith(END_OF_WORD) and word and _is_byte_level(word):
            found = bpe.tokenize(word)
            if len(found) == 1 and found[0].id == i:
                whole[word] = chr(i)
    return whole


def _rust_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> models.BPE:
    """The `tokenizers` (Rust) BPE model for one byte-level word: `</w>` joins its last symbol, then merges
    apply by rank."""
    return models.BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix=END_OF_WORD,
        ignore_merges=False,
        cache_capacity=0,  # ClipTokenizer caches words itself, without a Rust call per hit
    )


def _pack(ids: np.ndarray, counts: np.ndarray, length: int, sot: int, eot: int) -> np.ndarray:
    """The [N, length] int64 array: sot, then each text's ids (cut to length - 2), eot, zeros.

    A cut text keeps its first length - 1 tokens (sot included) and ends in eot, exactly like
    `clip.tokenize(..., truncate=True)`.
    """
    n = counts.size
    out = np.zeros((n, length), np.int64)
    out[:, 0] = sot
    kept = np.minimum(counts, length - 2)
    index = index_dtype(ids.size + out.size)
    first = np.cumsum(counts, dtype=index)
    first -= counts  # index in `ids` of each text's first id
    # The flat position in `out` of id k of the batch: its row's start + 1 + (k - first id of its row).
    position = np.repeat(np.arange(1, n * length + 1, length, dtype=index) - first, counts)
    position += np.arange(ids.size, dtype=index)
    if int(kept.sum()) != ids.size:  # some text is cut: keep only ids that land before its last column
        keep = position < np.repeat(np.arange(1, n * length + 1, length, dtype=index) + kept, counts)
        position, ids = position[keep], ids[keep]
    out.reshape(-1)[position] = ids
    out[np.arange(n), kept + 1] = eot
    return out
