"""A cache from whitespace-separated chunks of cleaned text to their token ids, and batch gathering.

Why chunks: OpenAI's pattern never matches whitespace, so the words (and hence token ids) of a cleaned text
are the concatenation of the words of its whitespace-separated chunks. Captions reuse a small set of chunks
("a", "photo", "of", "dog,"), so after the first batch almost every chunk is a dict hit and the regex and BPE
run only on new chunks. Token ids are stored flat (CSR: one int64 array plus offsets) so a whole batch is
gathered with a few numpy operations instead of a Python loop over tokens.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable

import numpy as np

__all__ = ["SEPARATOR", "ChunkCache"]

# Separates texts inside one joined batch string. Cleaned texts never contain NUL (ftfy deletes it,
# html.unescape cannot produce it, the fast path excludes it), and the spaces around it make it a chunk of
# its own, so a NUL chunk marks exactly one text boundary. ChunkCache checks the count anyway.
SEPARATOR = " \x00 "
_SEPARATOR_CHUNK = "\x00"


class ChunkCache:
    """chunk -> token ids, bounded: when full it is emptied and refilled by later batches."""

    def __init__(
        self,
        encode_chunks: Callable[[list[str]], tuple[list[str], np.ndarray, np.ndarray]],
        capacity: int = 1 << 18,
    ) -> None:
        # new chunks -> (the same chunks in any order, their ids concatenated, number of ids of each)
        self._encode_chunks = encode_chunks
        self.capacity = capacity
        self._lock = threading.Lock()  # the arrays must not grow while a batch reads them
        self.clear()

    def clear(self) -> None:
        self._index: dict[str, int] = {}
        self._flat = array("q")  # all cached ids, chunk after chunk
        self._offsets = array("q", [0])  # entry e owns _flat[_offsets[e]:_offsets[e + 1]]
        self._add([_SEPARATOR_CHUNK], np.zeros(0, np.int64), np.zeros(1, np.int64))  # entry 0: no ids

    def __len__(self) -> int:
        return len(self._index)

    def _add(self, chunks: list[str], ids: np.ndarray, lengths: np.ndarray) -> None:
        first = len(self._offsets) - 1
        self._index.update(zip(chunks, range(first, first + len(chunks)), strict=True))
        self._flat.frombytes(ids.astype(np.int64).tobytes())  # bulk copies, no per-int conversion
        self._offsets.frombytes((self._offsets[-1] + np.cumsum(lengths, dtype=np.int64)).tobytes())

    def _entries(self, chunks: list[str]) -> np.ndarray:
        """Entry number of each chunk, encoding and adding the ones not cached yet."""
        lookup = self._index.__getitem__  # map() with one argument: twice as fast as dict.get with a default
        try:
            return np.fromiter(map(lookup, chunks), np.int64, len(chunks))
        except KeyError:
            pass  # some chunks are new (usually found early in the batch, so little was wasted)
        new = [c for c in dict.fromkeys(chunks) if c not in self._index]  # unique, first-seen order
        if len(self._index) + len(new) > self.capacity and len(self._index) > 1:
            self.clear()  # then every chunk of this batch is new; one batch may exceed the capacity
            return self._entries(chunks)
        self._add(*self._encode_chunks(new))
        return np.fromiter(map(self._index.__getitem__, chunks), np.int64, len(chunks))

    def encode_joined(self, chunks: list[str], n_texts: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `n_texts` texts whose chunks are given in order, SEPARATOR chunks between texts.

        Returns (all ids concatenated, int64 [sum]) and (ids per text, int64 [n_texts]).
        """
        with self._lock:
            entries = self._entries(chunks)
            offsets = np.frombuffer(self._offsets, np.int64)
            flat = np.frombuffer(self._flat, np.int64)
            starts = offsets[entries]
            lengths = offsets[entries + 1] - starts
            ends = np.cumsum(lengths)
            total = int(ends[-1]) if ends.size else 0
            # Token k of the batch is flat[starts[e] + (k - first token of e)], e its chunk.
            ids = flat[np.repeat(starts - (ends - lengths), lengths) + np.arange(total)]
            del offsets, flat  # release the buffers so the arrays may grow next time
        boundaries = np.flatnonzero(entries == 0)
        if boundaries.size != n_texts - 1:
            raise RuntimeError(f"found {boundaries.size} text separators for {n_texts} texts")
        per_text = np.diff(np.concatenate(([0], ends[boundaries], [total])))
        return ids, per_text
