"""Training a CLIP-style vocabulary: layout, exactness of encoding against a plain BPE, save/load, the CLI.

Runs without OpenAI's vocabulary file: everything here is trained on a small generated caption file.
"""

from __future__ import annotations

import itertools
import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from clipforge.cli import main
from clipforge.tokenizer import ClipTokenizer, get_tokenizer, train_tokenizer
from clipforge.tokenizer.cleaning import WORD_RE, clean_text
from clipforge.tokenizer.vocab import bytes_to_unicode

WORDS = ["a", "an", "the", "photo", "picture", "of", "cat", "dog", "bird", "man", "woman", "child", "red"]
WORDS += ["green", "blue", "big", "small", "running", "sleeping"]
EXTRA = [
    "Café “naïve” façade",
    "日本語 テキスト",
    "emoji 😀👍🏽",
    "it's they're",
    "&amp; <b>tag</b>",
    "x" * 40,
]


def _captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 9))
        lines.append(" ".join(words) + rng.choice(["", ".", ",", "!", " 2024"]))
    return lines + EXTRA


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text("\n".join(_captions(400, 0)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(caption_file: Path) -> ClipTokenizer:
    return train_tokenizer([caption_file], vocab_size=700)


def _reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Textbook BPE as OpenAI's SimpleTokenizer.bpe does it: merge the lowest-rank adjacent pair, every
    occurrence left to right, until no pair has a rank."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = set(itertools.pairwise(symbols))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def test_vocabulary_layout(trained: ClipTokenizer) -> None:
    merges = trained._merges
    assert trained.vocab_size == 514 + len(merges) and 0 < len(merges) <= 700 - 514
    assert (trained.sot_token_id, trained.eot_token_id) == (trained.vocab_size - 2, trained.vocab_size - 1)
    assert not any(a.endswith("</w>") for a, _ in merges)  # only a word's last symbol carries </w>
    assert trained.decode([0]) == "!"  # the byte-to-unicode order, like OpenAI's


def test_encoding_equals_reference_bpe(trained: ClipTokenizer) -> None:
    ranks = {pair: i for i, pair in enumerate(trained._merges)}
    symbols = list(bytes_to_unicode().values())
    vocab = {
        s: i
        for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in trained._merges])
    }
    byte_char = bytes_to_unicode()
    for text in _captions(200, 1):
        want = []
        for word in WORD_RE.findall(clean_text(text)):
            want += [vocab[s] for s in _reference_bpe("".join(byte_char[b] for b in word.encode()), ranks)]
        assert trained.encode(text) == want, text


def test_round_trip_through_save_and_load(trained: ClipTokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "clipforge_tokenizer.json").read_text())
    assert config["vocab"] == "merges.txt" and config["identity"] == trained.identity
    loaded = get_tokenizer(tmp_path / "tok")
    assert (loaded.identity, loaded.vocab_size) == (trained.identity, trained.vocab_size)
    texts = _captions(50, 2)
    assert torch.equal(loaded(texts, truncate=True), trained(texts, truncate=True))
    for text in texts:
        words = WORD_RE.findall(clean_text(text))
        assert loaded.decode(loaded.encode(text)) == "".join(w + " " for w in words)
    copy = pickle.loads(pickle.dumps(trained))
    assert copy.identity == trained.identity and copy.encode_batch(texts) == trained.encode_batch(texts)


def test_special_tokens_in_text(trained: ClipTokenizer) -> None:
    assert trained.encode("<|endoftext|>")[-1:] == [trained.eot_token_id]
    assert trained("a <|startoftext|>")[0, 2].item() == trained.sot_token_id


def test_training_is_deterministic(caption_file: Path, trained: ClipTokenizer) -> None:
    assert train_tokenizer([caption_file], vocab_size=700)._merges == trained._merges


def test_small_vocab_sizes(caption_file: Path) -> None:
    assert train_tokenizer([caption_file], vocab_size=514).vocab_size == 514
    assert train_tokenizer([caption_file], vocab_size=530).vocab_size == 530
    with pytest.raises(ValueError, match="at least 514"):
        train_tokenizer([caption_file], vocab_size=513)


def test_cli_train(caption_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli_tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(caption_file),
                str(caption_file),
                "--vocab-size",
                "600",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "600 ids" in capsys.readouterr().out
    tok = get_tokenizer(out)
    assert tok.vocab_size == 600 and tok.encode("a photo of a cat")
