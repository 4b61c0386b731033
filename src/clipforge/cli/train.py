"""`clipforge train RECIPE.toml [--section.field VALUE ...] [--resume latest|PATH]`."""

from __future__ import annotations

import argparse
import logging

from clipforge.configs import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a CLIP model from a recipe",
        description="Train from a TOML recipe (see configs/). Any field can be overridden with a dotted "
        "flag, e.g. --optim.lr 5e-4 --data.workers 2 --run.out_dir runs/x.",
    )
    p.add_argument("recipe", help="a TOML recipe, e.g. configs/quickstart.toml")
    p.add_argument(
        "--resume", default="", help="'latest' (newest checkpoint in run.out_dir) or a checkpoint path"
    )
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    from clipforge.configs import apply_overrides, load_toml
    from clipforge.train.config import TrainConfig
    from clipforge.train.loop import TrainingStopped, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = apply_overrides(load_toml(TrainConfig, args.recipe), args.overrides)
        cfg.data.validate()
    except (ConfigError, ValueError) as e:
        print(f"clipforge train: {e}")
        return 2
    try:
        result = train(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"clipforge train: {e}")
        return 1
    print(f"done: {result.step} steps, final loss {result.loss:.4f}, {result.samples_per_s:.0f} samples/s")
    if result.skipped:
        print("skipped samples: " + ", ".join(f"{k} {v}" for k, v in result.skipped.items()))
    if result.zeroshot:
        print("zero-shot: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.zeroshot.items()))
    print(f"run directory: {result.run_dir} (checkpoints, metrics.jsonl, curves.png, config.toml)")
    return 0
