"""Text cleaning and pre-tokenization, exactly as OpenAI's CLIP tokenizer does them, plus a proven fast path.

OpenAI's pipeline for one text is: `ftfy.fix_text`, `html.unescape` twice, strip, collapse every run of
whitespace (the `regex` module's `\\s`) to one space, strip, lowercase; then split into words with `PATTERN`.
`clean_text` is that pipeline, step for step. It costs tens of microseconds a text (ftfy dominates), so the
tokenizer skips it where it provably changes nothing but case and whitespace: see `is_fast_text`. On the
other texts, `fix_text` skips ftfy itself where ftfy provably does nothing, or only straightens quotes.
"""

from __future__ import annotations

import html
import re
import unicodedata

import ftfy
import ftfy.fixes
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex
from ftfy.badness import is_bad

__all__ = [
    "ASCII_PATTERN",
    "CHUNK_END",
    "ENTITY_START",
    "FTFY_CHARACTER_FIXERS",
    "PATTERN",
    "SLOW_CHAR",
    "WORD_RE",
    "ascii_words",
    "basic_clean",
    "clean_text",
    "fix_text",
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
ASCII_PATTERN = r"""[a-z]+|[0-9]|<\|startoftext\|>|<\|endoftext\|>|'(?:s|t|re|ve|m|ll|d)|[^\sa-z0-9]+"""
# `ascii_words` ends each chunk's words with CHUNK_END, and marks word ends with _MARK while splitting:
# both are ASCII whitespace, which no chunk holds and the pattern never matches.
CHUNK_END = " "
_MARK = "\t"

# Characters outside the fast path. A text is "fast" iff it has none of them and no `&` that could start
# an HTML entity: it is then ASCII and has no control character that ftfy would delete (C0 controls other
# than \t \n \x0c \r, and DEL; ESC is among them, so no terminal escapes either). An `&` followed by a space,
# \t, \n or \x0c, or ending the text, starts no entity for html.unescape nor for ftfy (`ENTITY_START`).
# ftfy's other fixers only touch non-ASCII text, and it maps \r to \n, which whitespace collapsing erases.
# So on a fast text clean_text(text) == " ".join(text.split()).lower(), and str.split() agrees with regex's
# \s there (they differ only on \x1c-\x1f, excluded). tests/test_tokenizer_cleaning.py checks it on
# adversarial sets. `slow_texts` tests the same bytes.
SLOW_CHAR = r"[^\t\n\x0c\r\x20-\x7e]"
ENTITY_START = r"&(?![\t\n\x0c ]|\Z)"
_SLOW_CHAR_RE = re.compile(SLOW_CHAR)
_ENTITY_START_RE = re.compile(ENTITY_START)
_AFTER_INERT_AMP = np.frombuffer(b"\t\n\x0c ", np.uint8)  # ENTITY_START's bytes, for `slow_texts`


def is_fast_text(text: str) -> bool:
    """True if `clean_text(text)` only collapses whitespace and lowercases ASCII (no ftfy, no unescape)."""
    # Two searches: the character class alone scans fastest, and few texts have an `&` at all.
    return _SLOW_CHAR_RE.search(text) is None and ("&" not in text or _ENTITY_START_RE.search(text) is None)


# What may make ftfy.fix_text change a text other than by straightening curly quotes: a character that one
# of its character-level fixers replaces or deletes, or an entity start for its HTML fixer. The set is a
# generous superset (control, format, surrogate, private-use, unassigned, line and paragraph separator
# characters; full- and half-width forms; ligatures), and a test checks every code point outside it
# against each of ftfy's character-level fixers. A newline is a control character, so such a text is one
# of ftfy's segments. The fixers that look at more than a character are gated by `is_bad` (mojibake) and
# NFC, which `fix_text` evaluates itself.
_FTFY_TRIGGER = regex.compile(
    r"&[#0-9A-Za-z]|[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3"
    r"\u3000\ufb00-\ufb4f\uff00-\uffef\ufff9-\ufffc]"
)
# ftfy's fixers that look at one character at a time (the tests check them on every code point outside
# _FTFY_TRIGGER), and the rest: steps of the mojibake fixer, gated by is_bad, and uncurl_quotes. The
# shortcut follows ftfy 6's order of fixes (tests compare it with ftfy.fix_text); an ftfy of another major
# version or with another set of fixers always runs in full.
FTFY_CHARACTER_FIXERS = (
    "unescape_html",
    "remove_terminal_escapes",
    "fix_c1_controls",
    "fix_latin_ligatures",
    "fix_character_width",
    "fix_line_breaks",
    "fix_surrogates",
    "remove_control_chars",
)
_FTFY_OTHER_FIXERS = (
    "restore_byte_a0",
    "replace_lossy_sequences",
    "decode_inconsistent_utf8",
    "uncurl_quotes",
)
_FTFY_SHORTCUT = ftfy.__version__.split(".")[0] == "6" and set(getattr(ftfy, "FIXERS", ())) == {
    *FTFY_CHARACTER_FIXERS,
    *_FTFY_OTHER_FIXERS,
}
_FTFY_MAX_SEGMENT = ftfy.TextFixerConfig().max_decode_length


def fix_text(text: str) -> str:
    """`ftfy.fix_text(text)`, without running ftfy where the result is known (2-3x faster there: its
    mojibake test, `is_bad`, is most of what is left).

    With no trigger character (see `_FTFY_TRIGGER`), ftfy's first pass changes a text only by straightening
    curly quotes (`uncurl_quotes`), the fixer for mojibake only acts on text that is not ASCII and
    `is_bad`, and the last step is NFC. So if the text and its straightened form are both not bad (or
    ASCII), and the latter is NFC, the first pass gives the straightened form and the second changes
    nothing: that is ftfy's result.
    """
    if _FTFY_SHORTCUT and len(text) <= _FTFY_MAX_SEGMENT and _FTFY_TRIGGER.search(text) is None:
        straight = ftfy.fixes.uncurl_quotes(text)
        if (
            not is_bad(text)
            and (straight == text or straight.isascii() or not is_bad(straight))
            and unicodedata.is_normalized("NFC", straight)
        ):
            return straight
    return ftfy.fix_text(text)


def basic_clean(text: str) -> str:
    """ftfy, then HTML-unescape twice (OpenAI unescapes twice: `&amp;lt;` becomes `<`), then strip."""
    text = fix_text(text)
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


def ascii_words(chunks: list[str]) -> list[str]:
    """OpenAI's words of lowercase ASCII chunks (no whitespace), in one list: each chunk's words, then
    `CHUNK_END`.

    One RE2 pass (Arrow, C++) over the chunks joined by spaces puts a mark after every word; splitting at the
    marks gives the words, and the spaces, which the pattern never matches, end the chunks. A flat list
    is what the word cache joins in one call, so no Python work is done per chunk.
    """
    if not chunks:
        return []
    joined = pa.array([CHUNK_END.join(chunks) + CHUNK_END], pa.large_string())
    marked = pc.replace_substring_regex(joined, pattern=ASCII_PATTERN, replacement="\\0" + _MARK)[0].as_py()
    return marked.replace(CHUNK_END, CHUNK_END + _MARK).split(_MARK)[:-1]  # the last is the empty tail


def slow_texts(texts: pa.Array) -> np.ndarray:
    """Indices of the texts (an Arrow string array) that are not fast (see `is_fast_text`): in real
    captions, one in a hundred. Both of its tests are on bytes (every non-ASCII character has UTF-8 bytes
    >= 0x80), so this looks at the bytes of the whole batch at once, with numpy."""
    offsets = np.frombuffer(texts.buffers()[1], np.int32)[texts.offset : texts.offset + len(texts) + 1]
    data = np.frombuffer(texts.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    control = data < 0x20
    for fast in b"\t\n\x0c\r":  # four passes of SIMD compares (np.isin would sort the batch's bytes)
        control &= data != fast
    slow = np.flatnonzero(control | (data > 0x7E))
    amp = np.flatnonzero(data == ord("&"))
    if amp.size:  # an `&` is slow unless an inert byte follows it or it ends its text (ENTITY_START)
        after = amp + 1
        ends_text = offsets[np.searchsorted(offsets, after + offsets[0])] == after + offsets[0]
        inert = np.isin(data[np.minimum(after, data.size - 1)], _AFTER_INERT_AMP)
        slow = np.concatenate([slow, amp[~(ends_text | inert)]])
    return np.unique(np.searchsorted(offsets, slow + offsets[0], side="right") - 1)
