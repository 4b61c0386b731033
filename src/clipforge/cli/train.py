"""`clipforge train RECIPE.toml [--section.field VALUE ...] [--resume latest|PATH] [--print-config]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing

from clipforge.configs import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a CLIP model from a recipe",
        description="Train from a TOML recipe (see configs/). Any field below can be overridden with a "
        "dotted flag, e.g. --optim.lr 5e-4 --data.workers 2 --run.out_dir runs/x. The whole config is "
        "checked before anything is written; a bad value is one line naming it, and exit status 2.",
        epilog=config_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="a TOML recipe, e.g. configs/quickstart.toml")
    p.add_argument(
        "--resume", default="", help="'latest' (newest checkpoint in run.out_dir) or a checkpoint path"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (recipe and overrides) as TOML, check it, and exit",
    )
    p.set_defaults(func=run, accepts_overrides=True)


def config_fields() -> str:
    """Every config field with its type and default, one a line: the list `--help` ends with."""
    from clipforge.configs import toml_value
    from clipforge.train.config import TrainConfig

    lines = ["config fields (--section.field VALUE), their types and defaults (docs/training.md says more):"]
    for section in dataclasses.fields(TrainConfig):
        default = section.default_factory()  # type: ignore[misc]
        types = typing.get_type_hints(type(default))
        for f in dataclasses.fields(default):
            value = getattr(default, f.name)
            shown = "(unset: the paper's or the loss's own)" if value is None else toml_value(value)
            name = f"{section.name}.{f.name}"
            lines.append(f"  {name:<26} {_type_name(types[f.name]):<22} {shown}")
    return "\n".join(lines)


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(typing.get_args(tp))
    return str(tp).replace("<class '", "").replace("'>", "").replace("typing.", "")


def run(args: argparse.Namespace) -> int:
    from clipforge.checkpoints import CheckpointError
    from clipforge.configs import apply_overrides, dump_toml, load_toml
    from clipforge.train.config import TrainConfig
    from clipforge.train.loop import TrainingStopped, train
    from clipforge.train.validate import validate_run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = apply_overrides(load_toml(TrainConfig, args.recipe), args.overrides)
        if args.print_config:
            print(dump_toml(cfg), end="")
            validate_run(cfg, args.resume)
            return 0
    except (ConfigError, ValueError) as e:
        print(f"clipforge train: {e}")
        return 2
    try:
        result = train(cfg, resume=args.resume)  # validates everything before it writes anything
    except TrainingStopped as e:
        print(f"clipforge train: {e}")
        return 1
    # A bad config, or weights that turn out not to fit as the run starts: one line, nothing written.
    except (ConfigError, CheckpointError) as e:
        print(f"clipforge train: {e}")
        return 2
    print(f"done: {result.step} steps, final loss {result.loss:.4f}, {result.samples_per_s:.0f} samples/s")
    skipped = {reason: n for reason, n in result.skipped.items() if n}
    if skipped:
        print("skipped samples: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    if result.zeroshot:
        print("zero-shot: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.zeroshot.items()))
    print(f"run directory: {result.run_dir} (checkpoints, metrics.jsonl, curves.png, config.toml)")
    return 0
