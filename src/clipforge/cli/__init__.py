"""The `clipforge` command. Each subcommand lives in its own module and registers itself here.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed namespace and returning an exit code. Parsing only: the work is done by the library.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `clipforge --help` lists them.
SUBCOMMANDS = [
    "models", "tokenizer", "train", "finetune", "eval", "convert", "merge", "embed", "index", "search",
    "serve",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge", description="CLIP models: load, tokenize, train, evaluate."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"clipforge.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Subcommands that take config overrides (`--optim.lr 5e-4`) receive the flags argparse doesn't know.
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
