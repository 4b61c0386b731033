"""`clipforge tokenizer train`: learn a CLIP-style BPE vocabulary from caption files."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train a CLIP-style BPE vocabulary on your captions")
    actions = p.add_subparsers(dest="tokenizer_command", required=True)
    t = actions.add_parser(
        "train",
        help="learn merges from caption files (one caption per line)",
        description="Train a byte-level BPE exactly like OpenAI's CLIP vocabulary (same cleaning, regex, "
        "</w>, special tokens last) and save it to a directory that `get_tokenizer(DIR)` loads.",
    )
    t.add_argument("captions", nargs="+", type=Path, help="UTF-8 text files, one caption per line")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in all (OpenAI's has 49408); min 514")
    t.add_argument("--out", type=Path, required=True, help="directory to write the tokenizer to")
    t.add_argument(
        "--min-frequency", type=int, default=2, help="least count of a pair to merge it (default 2)"
    )
    t.add_argument("--context-length", type=int, default=77, help="default context length it records (77)")
    t.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.tokenizer import train_tokenizer

    if args.tokenizer_command != "train":  # argparse only lets known actions through
        raise AssertionError(args.tokenizer_command)
    tokenizer = train_tokenizer(
        args.captions,
        args.vocab_size,
        min_frequency=args.min_frequency,
        context_length=args.context_length,
        show_progress=args.progress,
    )
    tokenizer.save(args.out)
    note = (
        "" if tokenizer.vocab_size == args.vocab_size else f" (asked for {args.vocab_size}: too few captions)"
    )
    print(f"saved {tokenizer.identity}: {tokenizer.vocab_size} ids{note} to {args.out}")
    return 0
