"""Batch string work in Arrow (C++), and a cache from strings (chunks, words) to their token ids.

Why chunks: OpenAI's pattern never matches whitespace, so the words (and hence token ids) of a cleaned text
are the concatenation of the words of its whitespace-separated chunks. Captions reuse a small set of chunks
("a", "photo", "of", "dog,"): a batch of 10,000 captions has ~69,000 chunks but only ~9,000 distinct ones.
So Arrow splits the whole batch and finds the distinct chunks (a hash table in C++, no Python object per
chunk), Python looks up only the distinct ones, and the regex and BPE run only on chunks never seen.

Why strings of id characters: an entry's ids are kept as a str with one character per id (`chr(id)`). A
batch's ids are then one C-level `"".join` and one `encode("utf-32-le")` into a numpy array, with no Python
work per token. Strings are also invisible to the garbage collector, so a big cache does not slow down the
process's collections (tuples or lists would be tracked). And a separator character, which no id uses,
lets the ids of many strings be joined in one call and split apart again (`IdCache.joined`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "ID_LIMIT",
    "SEPARATOR",
    "IdCache",
    "distinct",
    "gather_ids",
    "id_chars",
    "ids_of_chars",
    "index_dtype",
]

# Ids must be below ID_LIMIT, the last code point, which is kept as a separator: its character, SEPARATOR,
# is what a word cache gives for CHUNK_END, so joined ids split back into chunks at it (see `IdCache.joined`).
ID_LIMIT = 0x10FFFF
SEPARATOR = chr(ID_LIMIT)


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


class IdCache:
    """str -> its ids as a str of id characters, bounded: when full it is emptied and refilled.

    `base` entries are always there and do not count towards `capacity`. New strings are encoded in one
    call of `encode_new`, which gives (string, id characters) for all of them, as pairs or a dict.
    """

    def __init__(
        self,
        encode_new: Callable[[list[str]], Iterable[tuple[str, str]] | dict[str, str]],
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
            if None in found:
                self._add([key for key, ids in zip(keys, found, strict=True) if ids is None], keys)
                found = list(map(self._ids.__getitem__, keys))
            return found  # type: ignore[return-value]

    def joined(self, keys: list[str]) -> str:
        """The id characters of all `keys` (repeats welcome) in one string, encoding new ones first."""
        with self._lock:
            new = set(keys).difference(self._ids)
            if new:
                self._add(list(new), keys)
            return "".join(map(self._ids.__getitem__, keys))

    def _add(self, new: list[str], keys: list[str]) -> None:
        """Encode and cache `new`, the keys not cached yet; empty the cache first if they overflow it."""
        if len(self) + len(new) > self.capacity and len(self) > 0:
            self.clear()  # then most keys of this batch are new; one batch may exceed the capacity
            new = [key for key in dict.fromkeys(keys) if key not in self._ids]
        self._ids.update(self._encode_new(new))
