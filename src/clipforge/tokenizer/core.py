"""`ClipTokenizer`: OpenAI CLIP's tokenization, bit for bit, with the BPE in Rust (`tokenizers`).

The hot path for a batch: join the texts with a separator; find the few that need ftfy with C-level scans
of the joined string (`cleaning.is_fast_text` says which); clean those; lowercase and split the batch on
whitespace at once; join the cached ids of every chunk, kept as strings of id characters, in one C-level
call (`ChunkCache`: regex and BPE run only for chunks never seen); decode that string into a numpy array and
scatter it into the [N, context_length] tensor. No Python work per token, and per text only for the texts
that need ftfy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import models

from clipforge.tokenizer.chunks import ID_LIMIT, MARK, SEPARATOR, ChunkCache, id_chars, ids_of_chars
from clipforge.tokenizer.cleaning import ASCII_WORD_RE, WORD_RE, clean_text
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

# A character outside the fast path (see cleaning.is_fast_text), or NUL: NUL is the batch separator here,
# and a text containing it takes the slow path like any other text with a control character.
_SLOW_OR_NUL_RE = re.compile(r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]")
# The ASCII characters outside the fast path, NUL aside. `ch in text` per character is a fast C scan.
_SLOW_ASCII = "&" + "".join(map(chr, [*range(0x01, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F]))
_CLEAN_CACHE_SIZE = 1 << 16
_NUL = "\x00"  # SEPARATOR's chunk


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
        if self.vocab_size >= ID_LIMIT:
            raise ValueError(f"a vocabulary of {self.vocab_size} tokens is too large (max {ID_LIMIT - 1})")
        self.sot_token_id = vocab[SOT]
        self.eot_token_id = vocab[EOT]
        self._bpe = _rust_bpe(vocab, merges)
        # The caches start with every printable-ASCII word that BPE turns into one whole-word token (two
        # new words in three in captions): the word cache with all of them, the chunk cache with those
        # that are a chunk's only word (letters, or one character), so most new chunks need no regex.
        whole = _whole_words(vocab, self._bpe)
        specials = {SOT: id_chars([self.sot_token_id]), EOT: id_chars([self.eot_token_id])}
        self._base_words = {**whole, **specials, _NUL: MARK}  # NUL ends a chunk: its ids are MARK
        base_chunks = {w: ids for w, ids in whole.items() if w.isalpha() or len(w) == 1}
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        # Each id's bytes, "</w>" kept as the 4 bytes it spells: decode replaces it after UTF-8 decoding,
        # like OpenAI's, so a literal "</w>" typed in a text also decodes to a space.
        self._id_bytes = [bytes(byte_of[c] for c in token) for token in vocab]
        # ~120 bytes a chunk: the default holds ~30 MB (per DataLoader worker) before it starts over.
        self._chunks = ChunkCache(self._encode_chunks, capacity=cache_size, base=base_chunks)
        self._cleaned: dict[str, str] = {}
        self._reset_words()
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
        """All ids of `texts` concatenated, and the number of ids of each text."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return _ids_per_text(self._chunks.joined_ids(self._clean_and_split(texts)), len(texts))

    def _clean_and_split(self, texts: list[str]) -> list[str]:
        """The whitespace-separated chunks of all cleaned texts, in order, SEPARATOR's chunk between texts."""
        try:
            joined = SEPARATOR.join(texts)
        except TypeError:
            raise TypeError("texts must be a str or a sequence of str") from None
        slow = self._slow_texts(texts, joined)
        if not slow:
            return joined.lower().split()  # every text is fast: cleaning is just this
        # Runs of fast texts are joined and lowercased as one (ASCII, so lower() takes its fast path);
        # cleaned texts are lowercase already, their only whitespace single spaces.
        pieces = []
        start = 0
        for i in slow:
            if start < i:
                pieces.append(SEPARATOR.join(texts[start:i]).lower())
            pieces.append(self._clean(texts[i]))
            start = i + 1
        if start < len(texts):
            pieces.append(SEPARATOR.join(texts[start:]).lower())
        return SEPARATOR.join(pieces).split()

    @staticmethod
    def _slow_texts(texts: list[str], joined: str) -> list[int]:
        """Indices of the texts that need the full cleaning (in real captions, a few in a thousand).

        Found with whole-batch C scans (isascii, `in`), not a regex over every character: that scan alone
        would cost a fifth of the whole batch.
        """
        if joined.count("\x00") != len(texts) - 1:  # some text contains NUL: check one by one
            return [i for i, t in enumerate(texts) if _SLOW_OR_NUL_RE.search(t)]
        slow = set()
        if not joined.isascii():
            ascii_ = np.fromiter(map(str.isascii, texts), bool, len(texts))
            slow.update(np.flatnonzero(~ascii_).tolist())
        present = [ch for ch in _SLOW_ASCII if ch in joined]
        if present:
            positions = [m.start() for m in re.finditer("[" + re.escape("".join(present)) + "]", joined)]
            sizes = np.fromiter(map(len, texts), np.int64, len(texts)) + len(SEPARATOR)
            starts = np.cumsum(sizes) - sizes
            slow.update((np.searchsorted(starts, positions, side="right") - 1).tolist())
        return sorted(slow)

    def _clean(self, text: str) -> str:
        cleaned = self._cleaned.get(text)
        if cleaned is None:
            if len(self._cleaned) >= _CLEAN_CACHE_SIZE:
                self._cleaned.clear()
            cleaned = self._cleaned[text] = clean_text(text)
        return cleaned

    def _encode_chunks(self, chunks: list[str]) -> dict[str, str]:
        """The ids of chunks not cached yet, as {chunk: str of id characters}.

        ASCII chunks (nearly all) go through the stdlib-`re` twin of OpenAI's pattern, the rest through the
        pattern itself, each group in one call on its chunks joined (a call per chunk costs more than the
        matching). The BPE then encodes each distinct word once.
        """
        joined = SEPARATOR.join(chunks) + SEPARATOR
        if joined.isascii():
            ascii_chunks, other = chunks, []
        else:
            ascii_chunks = [c for c in chunks if c.isascii()]
            other = [c for c in chunks if not c.isascii()]
            joined = SEPARATOR.join(ascii_chunks) + SEPARATOR
        # Each chunk's words, then a NUL "word", whose ids are MARK: it ends the chunk's ids.
        words = ASCII_WORD_RE.findall(joined) if ascii_chunks else []
        if other:
            words += WORD_RE.findall(SEPARATOR.join(other) + SEPARATOR)
        ids_of = self._word_ids(words)
        per_chunk = "".join(map(ids_of.__getitem__, words)).split(MARK)
        if len(per_chunk) != len(chunks) + 1:  # the last is the empty string after the last MARK
            raise RuntimeError("a chunk contains NUL")  # cleaning guarantees it cannot
        return dict(zip(ascii_chunks + other, per_chunk[:-1], strict=True))

    def _word_ids(self, words: list[str]) -> dict[str, str]:
        """A dict holding the ids of every word in `words` (as id characters): the word cache, after BPE of
        the words new to it.

        BPE runs in Rust, one `tokenize` call per word: the whole `tokenizers.Tokenizer` pipeline costs more
        per word, even in batches. Most words never get here: see `_whole_words`.
        """
        new = set(words).difference(self._words)
        if len(self._words) - len(self._base_words) + len(new) > self._chunks.capacity:
            self._reset_words()  # bounded like the chunk cache; one batch may exceed the bound
            new = set(words).difference(self._words)
        new_words = list(new)
        # Usually every new word is printable ASCII, its own byte-level form: one check for all of them.
        if not _is_byte_level("".join(new_words)):
            byte_level = [w if w.isascii() and w.isprintable() else _byte_chars(w) for w in new_words]
        else:
            byte_level = new_words
        cache, tokenize = self._words, self._bpe.tokenize
        for word, chars in zip(new_words, byte_level, strict=True):
            cache[word] = "".join([chr(t.id) for t in tokenize(chars)])
        return cache

    def _reset_words(self) -> None:
        self._words = dict(self._base_words)

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
    vocabulary, where all 30,000-odd pass). Printable ASCII only: such a word is its own byte-level form.
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


def _ids_per_text(joined_ids: str, n_texts: int) -> tuple[np.ndarray, np.ndarray]:
    """(all ids, int64) and (ids per text) of the id characters of `n_texts` texts, MARK between texts."""
    codes = ids_of_chars(joined_ids + MARK)
    is_mark = codes == ID_LIMIT
    ends = np.flatnonzero(is_mark)
    if ends.size != n_texts:
        raise RuntimeError(f"found {ends.size} text ends for {n_texts} texts")
    return codes[~is_mark].astype(np.int64), np.diff(ends, prepend=-1) - 1


def _pack(ids: np.ndarray, counts: np.ndarray, length: int, sot: int, eot: int) -> np.ndarray:
    """The [N, length] int64 array: sot, then each text's ids (cut to length - 2), eot, zeros.

    A cut text keeps its first length - 1 tokens (sot included) and ends in eot, exactly like
    `clip.tokenize(..., truncate=True)`.
    """
    n = counts.size
    out = np.zeros((n, length), np.int64)
    out[:, 0] = sot
    kept = np.minimum(counts, length - 2)
    first = np.cumsum(counts) - counts  # index in `ids` of each text's first id
    # The flat position in `out` of id k of the batch: its row's start + 1 + (k - first id of its row).
    position = np.repeat(np.arange(n) * length + 1 - first, counts) + np.arange(ids.size)
    if int(kept.sum()) != ids.size:  # some text is cut: keep only ids that land before its last column
        keep = np.arange(ids.size) - np.repeat(first, counts) < np.repeat(kept, counts)
        position, ids = position[keep], ids[keep]
    out.reshape(-1)[position] = ids
    out[np.arange(n), kept + 1] = eot
    return out
