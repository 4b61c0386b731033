"""The shortcuts of the tokenizer's hot path, each proven equal to OpenAI's step-by-step pipeline.

1. Fast texts (`is_fast_text`): cleaning is whitespace splitting and ASCII lowercasing; ftfy and unescaping
   change nothing. Checked on every ASCII string of length <= 2, and many random adversarial ones.
2. Chunks: the words of a cleaned text are the words of its whitespace-separated chunks, in order.
3. Arrow's steps (C++) do what the Python ones would: `slow_texts` finds exactly the texts that are not
   fast; the ASCII lowercase and split give str.split()'s chunks (and empty ones, which have no ids);
   `ascii_words` (an RE2 twin of the pattern, on all chunks joined) gives OpenAI's words of lowercase
   ASCII chunks.
4. GPT-2's byte-to-unicode map applied to printable ASCII is the identity.
5. Cleaned text never holds NUL nor the characters on which str.split and regex's \\s disagree; str.lower
   is idempotent (cleaned texts are lowercased twice: by clean_text, then by Arrow's ASCII lowercase).
None of this needs the vocabulary file.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import ftfy
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from clipforge.tokenizer.cleaning import (
    _FTFY_SHORTCUT,
    _FTFY_TRIGGER,
    CHUNK_END,
    FTFY_CHARACTER_FIXERS,
    WORD_RE,
    ascii_words,
    clean_text,
    fix_text,
    is_fast_text,
    slow_texts,
)
from clipforge.tokenizer.core import _byte_chars
from clipforge.tokenizer.vocab import bytes_to_unicode

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer" / "openai_golden.jsonl.gz"
ASCII = [chr(c) for c in range(128)]
# Characters the cleaning treats specially, overweighted in random strings.
TRICKY = [
    *"&;#<>|/'sStTrRvVmMlLdD0123456789 \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x00\x01\x1b\x7f[]",
    "&amp;", "&lt;", "&#39;", "&#x27;", "&nbsp", "<|endoftext|>", "<|startoftext|>", "'s", "'LL", "\r\n",
    "\x1b[31m", "\xa0", "\u3000", "\u2028", "\x85", "\u0345", "ſ", "İ", "Σ", "’", "ﬁ", "Ａ", "\u0301", "Ã©",
    "â€™", "😀", "\u200d", "\ufeff", "\ud800", "日本", "١", "½",
]  # fmt: skip


def _golden_texts() -> list[str]:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f.read().rstrip("\n").split("\n")[1:]]


def _random_texts(n: int, seed: int, alphabet: list[str]) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 24))) for _ in range(n)]


def _fast_clean(text: str) -> str:
    """What the tokenizer does to a fast text instead of clean_text."""
    return " ".join(text.lower().split())


def test_fast_path_on_every_short_ascii_string() -> None:
    strings = [a + b for a in ASCII for b in ASCII] + ASCII + [""]
    fast = [s for s in strings if is_fast_text(s)]
    assert len(fast) > 8000  # most of them are fast
    bad = [s for s in fast if clean_text(s) != _fast_clean(s)]
    assert not bad, bad[:10]


def test_fast_path_on_random_adversarial_strings() -> None:
    printable = [chr(c) for c in range(0x20, 0x7F)]
    texts = _random_texts(4000, 0, ASCII + TRICKY * 3) + _random_texts(
        6000, 1, ASCII + printable * 4 + TRICKY
    )
    fast = [s for s in texts if is_fast_text(s)]
    assert len(fast) > 2000
    bad = [s for s in fast if clean_text(s) != _fast_clean(s)]
    assert not bad, bad[:10]


def test_fast_path_around_ampersands() -> None:
    # An `&` before whitespace or at the end starts no entity; the texts around it are cleaned as usual.
    strings = [
        a + "&" + b + c for a in ["", "x", "&"] for b in ASCII for c in ["", "amp;", " ", "#39;", "\r"]
    ]
    fast = [s for s in strings if is_fast_text(s)]
    assert len(fast) == 40  # "&" then one of \t \n \x0c and space, then any of the five tails, twice
    bad = [s for s in fast if clean_text(s) != _fast_clean(s)]
    assert not bad, bad[:10]


@pytest.mark.parametrize(
    "char", ["&", "\x00", "\x01", "\x0b", "\x1b", "\x1c", "\x1f", "\x7f", "é", "’", "\xa0"]
)
def test_fast_path_refuses_what_cleaning_changes(char: str) -> None:
    assert not is_fast_text(f"a{char}b")


def test_fast_path_accepts_ascii_text_and_its_whitespace() -> None:
    assert is_fast_text("A photo of a cat, 3:00 (cute!) <b>hi</b> 'quoted' $5 @x #y\t\n\r\x0c~")
    assert is_fast_text("black & white &\tred &\ngreen &")


def test_ftfy_has_the_fixers_the_shortcut_knows() -> None:
    assert _FTFY_SHORTCUT  # else fix_text always runs ftfy: right, but slow, and these tests prove nothing


def test_every_character_outside_the_triggers_is_left_alone_by_ftfy_fixers() -> None:
    inert = "".join(c for c in map(chr, range(0x110000)) if _FTFY_TRIGGER.search(c) is None)
    assert len(inert) > 100_000 and "&" in inert and "é" in inert and "’" in inert
    for name in FTFY_CHARACTER_FIXERS:
        assert ftfy.FIXERS[name](inert) == inert, name


def test_fix_text_equals_ftfy() -> None:
    # Quotes, accents, mojibake, combining marks, CJK, emoji, entities and the triggers, mixed.
    alphabet = [*"abcXYZ019 .,'&;#<", *"’‘“”‚„ʼ′", *"éàüñçØßÆœ", "Ã©", "â€™", "Ã", "Â", "\xa0", "\u0301",
                "\u0308", "日本", "한", "😀", "👍🏽", "\u200d", "ﬁ", "Ａ", "\u3000", "&amp;", "&#39;", "\n",
                "\r", "\x85", "\x1b[1m", "\ufeff"]  # fmt: skip
    texts = _golden_texts() + _random_texts(8000, 5, alphabet) + _random_texts(4000, 6, [*"ab ’“”é&"])
    shortcut = [t for t in texts if _FTFY_TRIGGER.search(t) is None]
    assert len(shortcut) > 2000  # the shortcut is exercised
    bad = [t for t in texts if fix_text(t) != ftfy.fix_text(t)]
    assert not bad, bad[:10]


def _words_by_chunks(text: str) -> list[str]:
    """The tokenizer's route to the words: clean (or the fast shortcut), split, match chunk by chunk."""
    cleaned = _fast_clean(text) if is_fast_text(text) else clean_text(text)
    return [w for chunk in cleaned.split() for w in WORD_RE.findall(chunk)]


def test_words_of_chunks_equal_words_of_text() -> None:
    texts = _golden_texts() + _random_texts(4000, 2, ASCII + TRICKY * 4)
    bad = [t for t in texts if _words_by_chunks(t) != WORD_RE.findall(clean_text(t))]
    assert not bad, bad[:10]


def test_ascii_words_equal_openai_pattern_on_lowercase_ascii_chunks() -> None:
    rng = random.Random(3)
    contractions = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "''"]
    specials = ["<|startoftext|>", "<|endoftext|>", "<|endoftext|", "<|"]
    controls = [chr(c) for c in [*range(0x01, 0x09), 0x0E, 0x1C, 0x1F, 0x7F]]  # not whitespace to Arrow
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + contractions * 3 + specials + controls
    chunks = ["".join(rng.choices(alphabet, k=rng.randint(1, 30))).lower() for _ in range(20000)]
    chunks += [(a + b).lower() for a in ASCII for b in ASCII if not set(a + b) & set(" \t\n\x0b\x0c\r")]
    # Letters alone, and letters then non-alphanumerics (the commonest shape of a new chunk).
    letters = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 12))) for _ in range(3000)]
    tails = [chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()] + contractions + specials + ["'s'"]
    chunks += letters + [w + "".join(rng.choices(tails, k=rng.randint(1, 4))).lower() for w in letters]
    assert ascii_words(chunks) == [w for c in chunks for w in (*WORD_RE.findall(c), CHUNK_END)]
    assert ascii_words([]) == []


def test_slow_texts_are_exactly_the_texts_that_are_not_fast() -> None:
    texts = _golden_texts() + _random_texts(6000, 6, ASCII + TRICKY)
    texts += ["a &", " b", "&", "&", "x", "& ", "&&", "a&\t", "", "&"]  # `&` at the ends of texts
    texts = [t for t in texts if not any(0xD800 <= ord(c) < 0xE000 for c in t)]  # not UTF-8: no Arrow
    want = [i for i, t in enumerate(texts) if not is_fast_text(t)]
    assert 1000 < len(want) < len(texts) - 1000
    assert slow_texts(pa.array(texts, pa.string())).tolist() == want
    # A slice of an array (its offsets start inside the buffers), and an empty one.
    part = pa.array(texts, pa.string()).slice(1000, 500)
    assert slow_texts(part).tolist() == [i - 1000 for i in want if 1000 <= i < 1500]
    assert slow_texts(pa.array([], pa.string())).tolist() == []


def test_arrow_split_gives_the_chunks_of_str_split() -> None:
    texts = _golden_texts() + _random_texts(4000, 7, ASCII + TRICKY * 4)
    cleaned = [t if is_fast_text(t) else clean_text(t) for t in texts]  # what the tokenizer splits
    got = pc.ascii_split_whitespace(pc.ascii_lower(pa.array(cleaned, pa.string()))).to_pylist()
    bad = [t for t, c, g in zip(texts, cleaned, got, strict=True) if [x for x in g if x] != c.lower().split()]
    assert not bad, bad[:10]


def test_cleaned_text_has_no_separator_and_splits_like_regex_whitespace() -> None:
    texts = _golden_texts() + _random_texts(3000, 4, TRICKY)
    texts += [f"a&#{n};b &#x{n:x};" for n in range(0x110)]  # every C0/C1 control written as an entity
    for text in texts:
        cleaned = clean_text(text)
        assert "\x00" not in cleaned, text
        assert not any(c.isspace() for c in cleaned.replace(" ", "")), text  # only single spaces remain


def test_lower_is_idempotent_on_every_code_point() -> None:
    chars = "".join(map(chr, range(sys.maxunicode + 1)))
    once = chars.lower()
    assert once.lower() == once


def test_byte_level_mapping_shortcut() -> None:
    byte_char = bytes_to_unicode()
    tricky = [t for t in TRICKY if t != "\ud800"]  # surrogates never get this far: ftfy replaces them
    words = [chr(c) for c in range(0x800)] + _random_texts(3000, 5, ASCII + tricky)
    bad = [w for w in words if _byte_chars(w) != "".join(byte_char[b] for b in w.encode("utf-8"))]
    assert not bad, bad[:10]
