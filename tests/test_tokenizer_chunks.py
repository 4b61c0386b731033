"""The batch machinery of the tokenizer: Arrow's distinct strings, gathering ids back, the bounded caches,
and the whole-word shortcut, which must never trust a token that BPE cannot reach."""

from __future__ import annotations

import pyarrow as pa
import pytest

from clipforge.tokenizer import ClipTokenizer
from clipforge.tokenizer.chunks import (
    ID_LIMIT,
    SEPARATOR,
    IdCache,
    distinct,
    gather_ids,
    id_chars,
    ids_of_chars,
)


def test_id_chars_round_trip_every_kind_of_id() -> None:
    ids = [0, 1, 255, 256, 49407, 0xD800, 0xDFFF, 0xFFFF, 0x10000, ID_LIMIT - 1]  # surrogates included
    assert ids_of_chars(id_chars(ids)).tolist() == ids
    assert ids_of_chars("").size == 0
    assert SEPARATOR not in id_chars(ids) and ord(SEPARATOR) == ID_LIMIT  # no id is the separator


def test_distinct_then_gather_puts_the_groups_back_together() -> None:
    groups = [["a", "bb", "a"], [], ["bb"], ["", "ccc"]]
    values, which, per_group = distinct(pa.array(groups, pa.list_(pa.string())))
    assert sorted(values) == ["", "a", "bb", "ccc"] and per_group.tolist() == [3, 0, 1, 2]
    assert [values[i] for i in which] == [s for g in groups for s in g]
    ids_of = {"": "", "a": id_chars([1]), "bb": id_chars([2, 3]), "ccc": id_chars([4, 5, 6])}
    ids, counts = gather_ids([ids_of[v] for v in values], which, per_group)
    assert ids.tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 6] and counts.tolist() == [4, 0, 2, 3]


def test_distinct_of_nothing() -> None:
    values, which, per_group = distinct(pa.array([], pa.list_(pa.string())))
    ids, counts = gather_ids(values, which, per_group)
    assert values == [] and ids.size == 0 and counts.size == 0


def test_id_cache_encodes_only_new_keys_and_stays_bounded() -> None:
    calls: list[list[str]] = []

    def encode(keys: list[str]) -> dict[str, str]:
        calls.append(keys)
        return {k: id_chars([len(k)]) for k in keys}

    cache = IdCache(encode, capacity=3, base={"base": "B"})
    assert cache.lookup(["x", "base", "yy"]) == [id_chars([1]), "B", id_chars([2])]
    assert calls == [["x", "yy"]] and len(cache) == 2
    assert cache.lookup(["yy", "x"]) == [id_chars([2]), id_chars([1])] and len(calls) == 1  # all cached
    cache.lookup(["zzz", "wwww"])  # 2 + 2 > 3: emptied first, then filled
    assert len(cache) == 2 and calls[-1] == ["zzz", "wwww"]
    assert cache.lookup(["base"]) == ["B"]  # the base survives emptying


def test_id_cache_joins_the_ids_of_repeated_keys() -> None:
    calls: list[list[str]] = []

    def encode(keys: list[str]) -> list[tuple[str, str]]:
        calls.append(sorted(keys))
        return [(k, id_chars([len(k), len(k)])) for k in keys]  # pairs do as well as a dict

    cache = IdCache(encode, capacity=3, base={" ": SEPARATOR})
    assert (
        cache.joined(["a", "bb", " ", "a", " "])
        == id_chars([1, 1, 2, 2]) + SEPARATOR + id_chars([1, 1]) + SEPARATOR
    )
    assert calls == [["a", "bb"]] and cache.joined(["bb"]) == id_chars([2, 2]) and len(calls) == 1
    assert cache.joined(["ccc", "dddd", "a"]) == id_chars([3, 3, 4, 4, 1, 1])  # overflows: emptied, refilled
    assert calls[-1] == ["a", "ccc", "dddd"] and len(cache) == 3


@pytest.fixture(scope="module")
def unreachable() -> ClipTokenizer:
    # "abc</w>" is in the vocabulary (third merge), but BPE on "abc" merges a+b first and then has no
    # merge for "ab" + "c</w>": BPE gives ["ab", "c</w>"], never the whole-word token.
    return ClipTokenizer([("a", "b"), ("b", "c</w>"), ("a", "bc</w>"), ("x", "y</w>")])


def test_whole_word_shortcut_skips_unreachable_tokens(unreachable: ClipTokenizer) -> None:
    vocab = {token: i for i, token in enumerate(unreachable._id_bytes)}
    assert unreachable.encode("abc") == [vocab[b"ab"], vocab[b"c</w>"]]
    assert "abc" not in unreachable._words._base and "xy" in unreachable._words._base
    assert unreachable.encode("xy abc xy") == [
        vocab[b"xy</w>"],
        vocab[b"ab"],
        vocab[b"c</w>"],
        vocab[b"xy</w>"],
    ]


def test_lone_surrogates_take_the_text_by_text_path(unreachable: ClipTokenizer) -> None:
    texts = ["xy\ud800 abc", "xy", "abc\udfff"]  # not UTF-8, so not for Arrow: cleaned one by one first
    assert unreachable.encode_batch(texts) == [unreachable.encode(t) for t in texts]
    assert unreachable.encode_batch(["xy"]) == [unreachable.encode("xy")]
