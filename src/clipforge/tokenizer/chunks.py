"""Batch string work in Arrow (C++), and a cache from strings (chunks, words) to their token ids.

Why chunks: OpenAI's pattern never matches whitespace, so the words (and hence token ids) of a cleaned text
are the concatenation of the words of its whitespace-separated chunks. Captions reuse a small set of chunks
("a", "photo", "of", "dog,"): a batch of 10,000 captions has ~69,000 chunks but only ~9,000 distinct ones.
So Arrow splits the whole batch and finds the distinct chunks (a hash table in C++, no Python object per
chunk), Python looks up only the distinct ones, and the regex and BPE run only on chunks never seen.

Why strings of id characters: an entry's ids are kept as a str with one character per id (`chr(id)`). A
batch's ids are then one C-level `"".join` and one `encode("utf-32-le")` into a numpy array, with no Python
work per token. Strings are also invisible to the garbage collector, so a big cache does not slow down the
process's collections (tuples or lists would be tracked).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "ID_LIMIT",
    "IdCache",
    "chars_of_ids",
    "distinct",
    "gather_ids",
    "id_chars",
    "ids_of_chars",
    "index_dtype",
    "split_at",
]

ID_LIMIT = 0x110000  # one past the last code point: vocabularies must be smaller


def id_chars(ids: list[int] | tuple[int, ...]) -> str:
    """Token ids as the str this module stores: one character per id."""
    return "".join(map(chr, ids))


def ids_of_chars(chars: str) -> np.ndarray:
    """The ids of a str of id characters, as a uint32 array."""
    # surrogatepass: ids 0xD800-0xDFFF (vocabularies over 55,295 tokens) are lone surrogates in a str.
    return np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), "<u4")  # little-endian, like the bytes


def distinct(groups: pa.ListArray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """For a list<string> array: (its distinct strings, the index of each string among them, strings per
    group). The hashing is Arrow's; only the distinct strings become Python objects."""
    encoded = pc.dictionary_encode(groups.flatten())
    return (
        encoded.dictionary.to_pylist(),
        encoded.indices.to_numpy().astype(np.int64),
        groups.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64),
    )


def gather_ids(values: list[str], which: np.ndarray, per_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `values[which[0]] + values[which[1]] + ...` (uint32), and how many of them each group of
    `per_group` consecutive items has: what `distinct` took apart, put back together as ids."""
    codes = ids_of_chars("".join(values))
    index = index_dtype(codes.size + which.size)
    lengths = np.fromiter(map(len, values), index, len(values))
    item_lengths = lengths[which]
    item_ends = np.cumsum(item_lengths, dtype=index)
    # Id k of the result is codes[start of its item's value + (k - first id of its item)]. The temporaries
    # are token-sized: int32 and in place where possible, as fresh memory costs page faults.
    offset = (np.cumsum(lengths, dtype=index) - lengths)[which]
    offset -= item_ends
    offset += item_lengths
    source = np.repeat(offset, item_lengths)
    source += np.arange(source.size, dtype=index)
    group_ends = np.cumsum(per_group)
    ends = np.concatenate(([0], item_ends))
    return codes[source], ends[group_ends] - ends[group_ends - per_group]


def index_dtype(size: int) -> type[np.signedinteger]:
    """int32 for positions in arrays this small (half the memory of int64), int64 beyond."""
    return np.int32 if size < 2**31 - 1 else np.int64


def chars_of_ids(ids: np.ndarray) -> str:
    """The inverse of `ids_of_chars`."""
    return ids.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")


def split_at(text: str, lengths: np.ndarray) -> list[str]:
    """`text` cut into consecutive pieces of the given lengths."""
    bounds = [0, *np.cumsum(lengths).tolist()]
    return [text[start:end] for start, end in pairwise(bounds)]


class IdCache:
    """str -> its ids as a str of id characters, bounded: when full it is emptied and refilled.

    `base` entries are always there and do not count towards `capacity`. New strings are encoded in one
    call of `encode_new`, which returns {string: id characters} for all of them.
    """

    def __init__(
        self,
        encode_new: Callable[[list[str]], dict[str, str]],
        capacity: int = 1 << 18,
        base: dict[str, str] | None = None,
    ) -> None:
        self._encode_new = encode_new
        self.capacity = capacity
        self._base = dict(base or {})
        self._lock = threading.Lock()  # one batch at a time fills the cache
        self.clear()

    def clear(self) -> None:
        self._ids = dict(self._base)

    def __len__(self) -> int:
        return len(self._ids) - len(self._base)

    def lookup(self, keys: list[str]) -> list[str]:
        """The id characters of each of `keys` (distinct strings), encoding the ones not cached yet."""
        with self._lock:
            found = list(map(self._ids.get, keys))
            if None not in found:
                return found  # type: ignore[return-value]
            new = [key for key, ids in zip(keys, found, strict=True) if ids is None]
            if len(self) + len(new) > self.capacity and len(self) > 0:
                self.clear()  # then most keys of this batch are new; one batch may exceed the capacity
                found = list(map(self._ids.get, keys))
                new = [key for key, ids in zip(keys, found, strict=True) if ids is None]
            added = self._encode_new(new)
            self._ids.update(added)
            return [added[key] if ids is None else ids for key, ids in zip(keys, found, strict=True)]
