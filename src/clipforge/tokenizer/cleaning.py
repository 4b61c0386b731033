"""Text cleaning and pre-tokenization, exactly as OpenAI's CLIP tokenizer does them, plus a proven fast path.

OpenAI's pipeline for one text is: `ftfy.fix_text`, `html.unescape` twice, strip, collapse every run of
whitespace (the `regex` module's `\\s`) to one space, strip, lowercase; then split into words with `PATTERN`.
`clean_text` is that pipeline, step for step. It costs tens of microseconds a text (ftfy dominates), so the
tokenizer skips it where it provably changes nothing but case and whitespace: see `is_fast_text`.
"""

from __future__ import annotations

import html
import re
import string

import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex

__all__ = [
    "ASCII_PATTERN",
    "PATTERN",
    "SLOW_CHAR",
    "WORD_RE",
    "ascii_words",
    "basic_clean",
    "clean_text",
    "is_fast_text",
    "pretokenize",
    "slow_texts",
    "whitespace_clean",
]

# OpenAI's pre-tokenization pattern, compiled with IGNORECASE like theirs (it matters: with it, `'ſ`, long s,
# is the contraction `'s`). The `regex` module, not `re`: `re` has no \p{L} / \p{N}.
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
WORD_RE = regex.compile(PATTERN, regex.IGNORECASE)
_WHITESPACE_RE = regex.compile(r"\s+")
# The same pattern for lowercase ASCII chunks (no whitespace), for RE2 (Arrow's regex engine; see
# `ascii_words`). On such text \p{L} is a-z, \p{N} is 0-9 and IGNORECASE has nothing left to fold. Letters
# and digits come first, as a speed-up that changes nothing: no other alternative can match where they
# can. RE2, like `regex`, takes the first alternative that matches (leftmost-first), and `+` is greedy.
# Equivalence is tested in test_tokenizer_cleaning.py.
_ASCII_BUT_LOWERCASE = "".join(chr(c) for c in range(1, 128) if not "a" <= chr(c) <= "z")
ASCII_PATTERN = r"""[a-z]+|[0-9]|<\|startoftext\|>|<\|endoftext\|>|'(?:s|t|re|ve|m|ll|d)|[^\sa-z0-9]+"""

# Characters outside the fast path. A text is "fast" iff it has none: it is then ASCII with no `&` (nothing
# for html.unescape or ftfy's entity fixer) and no control character ftfy would delete (C0 controls other
# than \t \n \x0c \r, and DEL; ESC is among them, so no terminal escapes either). ftfy's other fixers only
# touch non-ASCII text, and it maps \r to \n, which whitespace collapsing erases. So on a fast text
# clean_text(text) == " ".join(text.split()).lower(), and str.split() agrees with regex's \s there (they
# differ only on \x1c-\x1f, excluded). tests/test_tokenizer_cleaning.py checks it on adversarial sets.
# The pattern means the same to `re` and to RE2 (Arrow's engine; see `slow_texts`).
SLOW_CHAR = r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]"
_SLOW_CHAR_RE = re.compile(SLOW_CHAR)


def is_fast_text(text: str) -> bool:
    """True if `clean_text(text)` only collapses whitespace and lowercases ASCII (no ftfy, no unescape)."""
    return _SLOW_CHAR_RE.search(text) is None


def basic_clean(text: str) -> str:
    """ftfy, then HTML-unescape twice (OpenAI unescapes twice: `&amp;lt;` becomes `<`), then strip."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse whitespace runs to one space and strip, with `regex`'s Unicode `\\s` (not str.split's)."""
    return _WHITESPACE_RE.sub(" ", text).strip()


def clean_text(text: str) -> str:
    """The full OpenAI cleaning of one text: what its tokenizer feeds to the pre-tokenization regex."""
    return whitespace_clean(basic_clean(text)).lower()


def pretokenize(text: str) -> list[str]:
    """OpenAI's words of `text` (cleaned first): the units BPE runs on, before the byte-level mapping."""
    return WORD_RE.findall(clean_text(text))


def ascii_words(chunks: pa.Array) -> pa.ListArray:
    """OpenAI's words of each chunk (lowercase ASCII, no whitespace), as Arrow lists, in C++.

    Letters then non-alphanumerics ("dog,", the commonest shape of a new chunk after a plain word) need no
    regex: the letters are one word and the rest another, since no contraction or special token can start
    where no letter follows. The other chunks get a space after every match of `ASCII_PATTERN` and are
    split on spaces; their lists end with an empty string, which has no ids. (The tokenizer handles chunks
    of letters alone before calling this: each is one word.)
    """
    two = pc.match_substring_regex(chunks, "^[a-z]+[^a-z0-9]+$").to_numpy(zero_copy_only=False)
    other = pc.filter(chunks, ~two)
    lists = [
        _letters_then_rest(pc.filter(chunks, two)),
        pc.split_pattern(pc.replace_substring_regex(other, pattern=ASCII_PATTERN, replacement="\\0 "), " "),
    ]
    order = np.concatenate([np.flatnonzero(two), np.flatnonzero(~two)])
    return pc.take(pa.concat_arrays(lists), np.argsort(order))  # each chunk's list back in its place


def _letters_then_rest(chunks: pa.Array) -> pa.ListArray:
    """[letters, rest] of each chunk made of lowercase letters then non-alphanumerics."""
    n = len(chunks)
    letters = pc.utf8_rtrim(chunks, characters=_ASCII_BUT_LOWERCASE)
    rest = pc.utf8_ltrim(chunks, characters=string.ascii_lowercase)
    interleaved = np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel()  # letters 0, rest 0, ...
    values = pc.take(pa.concat_arrays([letters, rest]), interleaved)
    return pa.ListArray.from_arrays(np.arange(0, 2 * n + 1, 2, dtype=np.int32), values)


def slow_texts(texts: pa.Array) -> np.ndarray:
    """Indices of the texts (an Arrow string array) that are not fast (see `is_fast_text`): in real
    captions, one in a hundred. One RE2 scan in C++ over the whole batch."""
    return np.flatnonzero(pc.match_substring_regex(texts, SLOW_CHAR).to_numpy(zero_copy_only=False))
