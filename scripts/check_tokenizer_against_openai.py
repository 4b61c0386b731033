"""Differential check: clipforge's tokenizer against OpenAI's `clip.tokenize` on many texts, in every mode.

The golden fixture (tests/fixtures/tokenizer) pins 2,215 strings; this script runs the wider net on demand:
every caption of the pictext shards plus seeded random strings drawn from the characters and pieces that the
cleaning and the shortcuts treat specially (quotes, entities, mojibake, controls, special tokens, emoji...).
It needs OpenAI's code, so it runs in the reference environment, with clipforge from this checkout:

    CLIPFORGE_BPE_PATH=.../bpe_simple_vocab_16e6.txt.gz \\
        $CLIPFORGE_BENCH_ENV/bin/python scripts/check_tokenizer_against_openai.py --random 40000

`$CLIPFORGE_BENCH_ENV` is the reference environment, built by `bench/setup_env.sh $CLIPFORGE_BENCH_ENV`
(docs/parity.md).

Modes: one big batch (the Arrow path), batches of 100 (the plain-Python path), and batches of 3,000 through
a 500-entry cache (emptied again and again). Exit status 1 if any row differs.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.tokenizer import load_captions  # noqa: E402

from clipforge.tokenizer import ClipTokenizer, load_openai_merges  # noqa: E402

PIECES = [
    *"abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()[]{}<>/\\|-_+=*&^%$#@~`\t\n\r",
    *"’‘“”‚„ʼ′″éàüñçØßÆœÉÀÜÑ–—…°×€£¿¡ıſİΣ١½",
    "Ã©", "â€™", "Ã", "Â", "\xa0", "\u0301", "\u0308", "日本", "한국", "😀", "👍🏽", "\u200d", "ﬁ", "Ａ",
    "\u3000", "&amp;", "&#39;", "&lt;", "&nbsp;", "& ", " &", "\x85", "\x1b[1m", "\ufeff", "\u2028",
    "<|endoftext|>", "<|startoftext|>", "'s", "'LL", "\x00", "\x01", "\x1c", "\x7f", "dog,", "cat's",
    "87pt14step,",
]  # fmt: skip


def tokenize_in(batch: int, cache_size: int) -> Callable[[list[str]], np.ndarray]:
    def run(texts: list[str]) -> np.ndarray:
        tok = ClipTokenizer(load_openai_merges(), name="openai", cache_size=cache_size)
        parts = [tok(texts[i : i + batch], truncate=True).numpy() for i in range(0, len(texts), batch)]
        return np.concatenate(parts)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pictext")
    parser.add_argument("--random", type=int, default=40000, help="random strings besides the captions")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import clip  # OpenAI's code: only in the reference environment

    rng = random.Random(args.seed)
    randoms = ["".join(rng.choices(PIECES, k=rng.randint(0, 30))) for _ in range(args.random)]
    texts = (load_captions(args.data) if args.data.exists() else []) + randoms
    reference = clip.tokenize(texts, 77, truncate=True).numpy()
    modes = {
        "one batch": tokenize_in(len(texts), 1 << 18),
        "batches of 100": tokenize_in(100, 1 << 18),
        "batches of 3,000, 500-entry cache": tokenize_in(3000, 500),
    }
    failed = False
    for mode, run in modes.items():
        bad = np.flatnonzero((run(texts) != reference).any(axis=1))
        examples = [texts[i] for i in bad[:3]]
        print(f"{mode}: {len(texts)} texts, {len(bad)} rows differ from OpenAI's", examples)
        failed |= bool(bad.size)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
