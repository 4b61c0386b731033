"""Train a CLIP-style byte-level BPE vocabulary on your own captions.

The result tokenizes exactly the way OpenAI's does, only with other merges: the same cleaning, the same
pre-tokenization regex, byte-level symbols with `</w>` on each word's last symbol, and the vocabulary laid out
like OpenAI's (512 byte symbols, one id per merge, then `<|startoftext|>` and `<|endoftext|>` last).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from clipforge.tokenizer.cleaning import WORD_RE, clean_text, is_fast_text
from clipforge.tokenizer.core import ClipTokenizer
from clipforge.tokenizer.vocab import END_OF_WORD, EOT, SOT

__all__ = ["MIN_VOCAB_SIZE", "caption_words", "train_tokenizer"]

# 256 byte symbols, the same 256 with </w>, and the two special tokens: a vocabulary with no merges.
MIN_VOCAB_SIZE = 514


def caption_words(lines: Iterable[str]) -> Iterator[str]:
    """For each non-empty caption: its words as the tokenizer will see them, joined by single spaces.

    The special-token words are left out: in a text they always become the special ids, never BPE pieces.
    """
    for line in lines:
        text = line.rstrip("\r\n")
        cleaned = text.lower() if is_fast_text(text) else clean_text(text)
        words = [w for w in WORD_RE.findall(cleaned) if w not in (SOT, EOT)]
        if words:
            yield " ".join(words)


def _read_lines(files: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            yield from f


def train_tokenizer(
    files: Iterable[str | os.PathLike[str]],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    context_length: int = 77,
    show_progress: bool = False,
) -> ClipTokenizer:
    """Learn a vocabulary of at most `vocab_size` ids from caption files (UTF-8, one caption per line).

    Fewer ids result when the captions support fewer merges (each merged pair must occur `min_frequency`
    times); `tokenizer.vocab_size` says how many. Save it with `tokenizer.save(directory)`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (bytes, bytes + </w>, 2 specials)")
    num_merges = vocab_size - MIN_VOCAB_SIZE
    bpe = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    # Words come pre-split by caption_words (OpenAI's regex, not a Rust one): split on the spaces only.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", "removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        # The trainer counts its alphabet (<= 512 symbols) in vocab_size: ask for enough merges, cut below.
        vocab_size=num_merges + 512,
        min_frequency=min_frequency,
        special_tokens=[],  # ours go at the end of the vocabulary, not the start where the trainer puts them
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        show_progress=show_progress,
    )
    bpe.train_from_iterator(caption_words(_read_lines(files)), trainer=trainer)
    merges = _merges_of(bpe)[:num_merges]
    return ClipTokenizer(merges, name="trained", context_length=context_length)


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    """The learned merges in rank order (tokenizers serializes them as pairs, or as "a b" in old versions)."""
    raw = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in raw]  # type: ignore[misc]
