"""OpenAI's tokenizer, reproduced bit for bit: every golden string of the fixture, every output.

The fixture (tests/fixtures/tokenizer/openai_golden.jsonl.gz, made by scripts/make_tokenizer_golden.py with
OpenAI's own code) holds >2,000 adversarial strings with OpenAI's `encode`, `decode` and `clip.tokenize` rows
(context 77 and 16, truncate off and on). These tests need OpenAI's vocabulary file: they skip without it,
except in CI (or with CLIPFORGE_REQUIRE_BPE=1), where they fail.
"""

from __future__ import annotations

import gzip
import json
import pickle
import random
from pathlib import Path

import pytest
import torch

import clipforge.tokenizer.core as core
from clipforge.tokenizer import ClipTokenizer, get_tokenizer
from clipforge.tokenizer.vocab import OPENAI_BPE_SHA256

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer" / "openai_golden.jsonl.gz"

pytestmark = pytest.mark.needs_openai_bpe  # conftest.py: skips without the file, fails without it in CI


def _load_fixture() -> tuple[dict, list[dict]]:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        lines = f.read().rstrip("\n").split("\n")  # json.dumps escapes every other line break
    return json.loads(lines[0])["meta"], [json.loads(line) for line in lines[1:]]


META, GOLDEN = _load_fixture()
TEXTS = [r["text"] for r in GOLDEN]


def _padded(row: list[int], length: int) -> list[int]:
    return row + [0] * (length - len(row))


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return get_tokenizer()


def test_fixture_is_what_the_tests_claim() -> None:
    assert len(GOLDEN) >= 2000
    assert META["bpe_sha256"] == OPENAI_BPE_SHA256
    assert sum(r["row"] is None for r in GOLDEN) > 50  # texts OpenAI refuses at 77 tokens
    assert sum(r["row_16"] is None for r in GOLDEN) > 500


def test_constants(tok: ClipTokenizer) -> None:
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert (tok.vocab_size, tok.context_length) == (49408, 77)
    assert tok.identity == "openai" and tok.to_dict()["vocab"] == "openai"
    assert get_tokenizer() is tok  # memoized


def test_encode_batch_matches_openai(tok: ClipTokenizer) -> None:
    got = tok.encode_batch(TEXTS)
    bad = [(r["text"], r["ids"], ids) for r, ids in zip(GOLDEN, got, strict=True) if ids != r["ids"]]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"


@pytest.mark.parametrize("arrow_from", [0, 10**9], ids=["arrow", "python"])
def test_both_batch_paths_match_openai_from_cold(monkeypatch: pytest.MonkeyPatch, arrow_from: int) -> None:
    monkeypatch.setattr(core, "ARROW_MIN_BATCH", arrow_from)  # every batch through one path
    fresh = ClipTokenizer(get_tokenizer()._merges, name="openai")
    want = torch.tensor([_padded(r["trunc_row"], 77) for r in GOLDEN])
    assert torch.equal(fresh(TEXTS, truncate=True), want)  # all new
    assert torch.equal(fresh(TEXTS[::-1], truncate=True), want.flip(0))  # all cached


def test_encode_one_by_one_cold_and_shuffled_matches_openai() -> None:
    # A fresh tokenizer (empty caches), texts one at a time in a shuffled order, through a cache so small it
    # is emptied again and again: the chunk cache must never change a result.
    tok = ClipTokenizer(get_tokenizer()._merges, name="openai", cache_size=64)
    order = list(range(len(GOLDEN)))
    random.Random(0).shuffle(order)
    for i in order:
        assert tok.encode(TEXTS[i]) == GOLDEN[i]["ids"], TEXTS[i]


@pytest.mark.parametrize("length,key", [(77, ""), (16, "_16")])
def test_tensor_truncate_true_matches_clip_tokenize(tok: ClipTokenizer, length: int, key: str) -> None:
    got = tok(TEXTS, context_length=length, truncate=True)
    want = torch.tensor([_padded(r["trunc_row" + key], length) for r in GOLDEN])
    assert got.dtype == torch.long and got.shape == (len(TEXTS), length)
    assert torch.equal(got, want)


@pytest.mark.parametrize("length,key", [(77, ""), (16, "_16")])
def test_tensor_truncate_false_matches_and_raises_exactly_where_openai_does(
    tok: ClipTokenizer, length: int, key: str
) -> None:
    fits = [r for r in GOLDEN if r["row" + key] is not None]
    got = tok([r["text"] for r in fits], context_length=length)
    assert torch.equal(got, torch.tensor([_padded(r["row" + key], length) for r in fits]))
    for r in GOLDEN:
        if r["row" + key] is None:
            with pytest.raises(ValueError, match="too long for context length"):
                tok(r["text"], context_length=length)


def test_too_long_error_names_the_text_and_its_count(tok: ClipTokenizer) -> None:
    text = "word " * 100
    with pytest.raises(ValueError) as info:
        tok(["fine", text])
    message = str(info.value)
    assert "100 tokens" in message and "'word word" in message and len(message) < 300


def test_decode_matches_openai(tok: ClipTokenizer) -> None:
    bad = [r["text"] for r in GOLDEN if tok.decode(r["ids"]) != r["decoded"]]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"


def test_decode_accepts_tensors_and_rejects_unknown_ids(tok: ClipTokenizer) -> None:
    row = tok("a photo of a cat")[0]
    assert tok.decode(row) == tok.decode(row.tolist()) == tok.decode(row.numpy())
    assert tok.decode([]) == ""
    for bad in ([49408], [-1], [3, 10**6]):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            tok.decode(bad)


def test_call_shapes_and_inputs(tok: ClipTokenizer) -> None:
    assert tok("a dog").shape == (1, 77)
    assert tok([]).shape == (0, 77)
    assert tok(("a", "b"), context_length=5).shape == (2, 5)
    assert tok([""]).tolist() == [[49406, 49407] + [0] * 75]
    assert tok("!", context_length=2, truncate=True).tolist() == [[49406, 49407]]
    with pytest.raises(ValueError, match="at least 2"):
        tok("a", context_length=1)
    with pytest.raises(TypeError, match="str"):
        tok(["a", 3])  # type: ignore[list-item]


def test_first_batch_of_a_fresh_tokenizer_may_have_no_ids(tok: ClipTokenizer) -> None:
    for texts in ([""], ["", " "], ["\t\n"], ["\x00"]):
        fresh = ClipTokenizer(tok._merges, name="openai")
        assert fresh(texts)[:, :3].tolist() == [[49406, 49407, 0]] * len(texts)
    assert tok.encode_batch([]) == [] and tok.encode("") == []


def test_texts_containing_nul_and_separator_lookalikes(tok: ClipTokenizer) -> None:
    # NUL separates texts inside a batch; texts that contain it must not be split by it.
    texts = ["a \x00 b", "\x00", " \x00 ", "x", "a\x00b"]
    want = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == want
    assert tok.encode_batch(texts[::-1]) == want[::-1]


def test_save_openai_writes_no_vocabulary(tok: ClipTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["clipforge_tokenizer.json"]
    assert get_tokenizer(tmp_path / "t") is tok


def test_pickle_round_trip(tok: ClipTokenizer) -> None:
    data = pickle.dumps(tok)
    assert len(data) < 1000  # OpenAI's merges are found again, not carried
    copy = pickle.loads(data)
    assert copy.identity == "openai" and copy.context_length == 77
    assert torch.equal(copy(TEXTS[:200], truncate=True), tok(TEXTS[:200], truncate=True))


def test_context_length_is_a_default_chosen_at_construction(tok: ClipTokenizer, tmp_path: Path) -> None:
    short = get_tokenizer(context_length=24)
    assert short.context_length == 24 and short is not tok and get_tokenizer(context_length=24) is short
    assert torch.equal(short(TEXTS[:50], truncate=True), tok(TEXTS[:50], context_length=24, truncate=True))
    tok.save(tmp_path / "t")  # a saved tokenizer's own length gives way to the one asked for
    assert get_tokenizer(tmp_path / "t", context_length=24) is short
    for bad in (1, 0, "24", 24.0, True, 1 << 20):
        with pytest.raises(ValueError, match="context_length must be an integer from 2"):
            get_tokenizer(context_length=bad)
