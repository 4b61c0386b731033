"""`clipforge finetune RECIPE.toml [--field VALUE ...] [--print-config]`: classification fine-tuning of the
image tower from the zero-shot head (docs/fine-tuning.md)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from clipforge.configs import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the image tower for classification, from the zero-shot head",
        description="Fine-tune a CLIP image tower with cross-entropy on a labelled set, its linear head "
        "starting as the zero-shot classifier (WiSE-FT's baseline). Any field below can be overridden, e.g. "
        "--lr 1e-5 --data.train shards/ --out_dir ft/. Everything is checked before anything is written; a "
        "bad value is one line naming it, and exit status 2.",
        epilog=config_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="a TOML recipe of the fields below")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=run, accepts_overrides=True)


def config_fields() -> str:
    """Every config field with its default, one a line: the list `--help` ends with."""
    from clipforge.configs import toml_value
    from clipforge.finetune.config import FinetuneConfig, FinetuneData

    lines = ["config fields (--field VALUE, --data.field VALUE) and their defaults:"]
    for prefix, default in (("", FinetuneConfig()), ("data.", FinetuneData())):
        for f in dataclasses.fields(default):
            value = getattr(default, f.name)
            if not dataclasses.is_dataclass(value):
                lines.append(f"  {prefix + f.name:<20} {toml_value(value)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from clipforge.configs import apply_overrides, dump_toml, load_toml
    from clipforge.finetune.classify import finetune
    from clipforge.finetune.config import FinetuneConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = apply_overrides(load_toml(FinetuneConfig, args.recipe), args.overrides)
        if args.print_config:
            print(dump_toml(cfg), end="")
            return 0
        result = finetune(cfg)  # checks everything before it writes anything
    except (ConfigError, ValueError) as e:
        print(f"clipforge finetune: {e}", file=sys.stderr)
        return 2
    accuracy = f"train accuracy {result.train_accuracy:.3f}"
    print(f"done: {result.steps} steps, final loss {result.loss:.4f}, {accuracy}")
    skipped = {reason: n for reason, n in result.skipped_by_reason.items() if n}
    if skipped:
        print("skipped training images: " + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())))
    if result.held_out is not None:
        h = result.held_out
        print(f"held-out: top1 {100 * h['top1']:.2f}%, top5 {100 * h['top5']:.2f}% ({h['n']} images)")
    print(f"model: {result.model_dir} (with config.toml and metrics.jsonl in {result.out_dir})")
    return 0
