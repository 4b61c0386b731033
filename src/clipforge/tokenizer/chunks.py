"""A cache from whitespace-separated chunks of cleaned text to their token ids, as strings of id characters.

Why chunks: OpenAI's pattern never matches whitespace, so the words (and hence token ids) of a cleaned text
are the concatenation of the words of its whitespace-separated chunks. Captions reuse a small set of chunks
("a", "photo", "of", "dog,"), so after the first batch almost every chunk is a dict hit and the regex and BPE
run only on new chunks.

Why strings: a chunk's ids are kept as a str with one character per id (`chr(id)`). A whole batch is then
one C-level `"".join` of dict lookups, and one `encode("utf-32-le")` turns it into a numpy array of ids, with
no Python work per chunk or per token. Strings are also invisible to the garbage collector, so a large cache
does not slow down the process's collections (tuples or lists would be tracked).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

__all__ = ["ID_LIMIT", "MARK", "SEPARATOR", "ChunkCache", "id_chars", "ids_of_chars"]

# Separates texts inside one joined batch string. Cleaned texts never contain NUL (ftfy deletes it,
# html.unescape cannot produce it, the fast path excludes it), and the spaces around it make it a chunk of
# its own, so a NUL chunk marks exactly one text boundary. The batch checks the count anyway.
SEPARATOR = " \x00 "
_SEPARATOR_CHUNK = "\x00"
# The character of the separator chunk in the joined ids: the last code point, never a token id.
MARK = "\U0010ffff"
ID_LIMIT = ord(MARK)  # vocabularies must be smaller than this


def id_chars(ids: list[int] | tuple[int, ...]) -> str:
    """Token ids as the str this module stores: one character per id."""
    return "".join(map(chr, ids))


def ids_of_chars(chars: str) -> np.ndarray:
    """The uint32 array of the code points of `chars` (ids, and MARK where a text ends)."""
    # surrogatepass: ids 0xD800-0xDFFF (vocabularies over 55,295 tokens) are lone surrogates in a str.
    return np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), np.uint32)


class ChunkCache:
    """chunk -> its ids as a str of id characters, bounded: when full it is emptied and refilled."""

    def __init__(
        self,
        encode_chunks: Callable[[list[str]], dict[str, str]],
        capacity: int = 1 << 18,
        base: dict[str, str] | None = None,
    ) -> None:
        self._encode_chunks = encode_chunks  # new chunks -> {chunk: its id characters}
        self.capacity = capacity  # chunks cached beyond `base`
        self._base = {**(base or {}), _SEPARATOR_CHUNK: MARK}  # always cached, never counted
        self._lock = threading.Lock()  # one batch at a time fills the cache
        self.clear()

    def clear(self) -> None:
        self._ids = dict(self._base)

    def __len__(self) -> int:
        return len(self._ids) - len(self._base)

    def joined_ids(self, chunks: list[str]) -> str:
        """The id characters of all `chunks`, concatenated, MARK for each separator chunk."""
        with self._lock:
            try:
                return "".join(map(self._ids.__getitem__, chunks))
            except KeyError:
                pass  # some chunks are new (usually found early in the batch, so little was wasted)
            new = set(chunks).difference(self._ids)
            if len(self) + len(new) > self.capacity and len(self) > 0:
                self.clear()  # then most chunks of this batch are new; one batch may exceed the capacity
                new = set(chunks).difference(self._ids)
            self._ids.update(self._encode_chunks(list(new)))
            return "".join(map(self._ids.__getitem__, chunks))
