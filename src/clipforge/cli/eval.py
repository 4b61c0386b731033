"""`clipforge eval zeroshot|linear-probe|retrieval|suite ...`: evaluation the paper's way.

    clipforge eval zeroshot --model M --data D --classes C.json [--templates T]
    clipforge eval linear-probe --model M --train D1 --test D2
    clipforge eval retrieval --model M --data D
    clipforge eval suite SUITE.toml

Each prints a table; --json OUT also writes the full results. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: zero-shot, linear probe, retrieval, suites",
        description="Evaluate a model the paper's way (docs/evaluation.md). --model takes anything "
        "clipforge.load() takes: a release name, a clipforge or checkpoint directory, an OpenAI .pt file.",
    )
    tasks = p.add_subparsers(dest="eval_command", required=True)
    for add in (_add_zeroshot, _add_linear_probe, _add_retrieval, _add_suite, _add_sweep):
        add(tasks)


def _add_zeroshot(tasks: argparse._SubParsersAction) -> None:
    z = tasks.add_parser("zeroshot", help="zero-shot classification with prompt ensembling")
    _model_args(z)
    _data_args(z, "--data", "the labelled evaluation set: tar shards, a class-folder tree or a CSV")
    z.add_argument(
        "--classes", required=True, help="class names: a JSON file or a built-in set (e.g. cifar10)"
    )
    z.add_argument(
        "--templates",
        default="",
        help="a template file, a built-in set (imagenet, identity, ...) "
        "or a literal like 'a photo of a {}.' (default: the class file's own, else '{}')",
    )
    z.add_argument("--confusion", default="", metavar="OUT.csv", help="also write the confusion matrix")
    z.set_defaults(func=run, kind="zeroshot")


def _add_linear_probe(tasks: argparse._SubParsersAction) -> None:
    lp = tasks.add_parser("linear-probe", help="logistic regression on frozen image features (paper A.3)")
    _model_args(lp)
    _data_args(lp, "--train", "the labelled training set")
    lp.add_argument("--test", required=True, help="the labelled test set (same format as --train)")
    lp.add_argument("--classes", default="", help="class names (default: the labels found in --train)")
    lp.add_argument(
        "--layer",
        choices=["pre-projection", "embed"],
        default="pre-projection",
        help="features before the vision tower's projection (the paper's) or the embedding",
    )
    lp.add_argument("--val-fraction", type=float, default=0.2, help="share of train held out to choose C")
    lp.add_argument("--seed", type=int, default=0)
    lp.set_defaults(func=run, kind="linear-probe")


def _add_retrieval(tasks: argparse._SubParsersAction) -> None:
    r = tasks.add_parser("retrieval", help="image<->text retrieval: Recall@1/5/10, mean and median rank")
    _model_args(r)
    _data_args(r, "--data", "images with captions: tar shards, a folder with .txt files or a CSV")
    r.set_defaults(func=run, kind="retrieval")


def _add_suite(tasks: argparse._SubParsersAction) -> None:
    s = tasks.add_parser("suite", help="run the tasks of a suite file, with cached features and a report")
    s.add_argument("suite", help="a TOML suite, e.g. configs/eval-pictext.toml")
    s.add_argument("--model", default="", help="overrides the suite's model")
    s.add_argument("--out", default="", help="overrides the suite's out_dir")
    s.add_argument("--cache-dir", default="", help="overrides the suite's cache_dir")
    s.add_argument("--no-cache", action="store_true", help="compute every feature, store nothing")
    s.add_argument("--device", default="", help="overrides the suite's device")
    s.add_argument("--int8", action="store_true", help="evaluate the int8 inference copy of the model")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_suite_command)


def _add_sweep(tasks: argparse._SubParsersAction) -> None:
    from clipforge.finetune import sweep  # WiSE-FT: its own flags and command live with it

    w = tasks.add_parser(
        "sweep",
        help="WiSE-FT: zero-shot accuracy of merges of two models, by alpha",
        description="Merge --model (A, zero-shot) and --fine-tuned (B) in memory at each alpha and evaluate "
        "zero-shot on --data (in-domain) and --held-out; writes sweep.json, sweep.md and sweep.png to --out "
        "(docs/fine-tuning.md).",
    )
    _model_args(w)  # --model: the zero-shot model A (alpha = 0)
    _data_args(w, "--data", "the in-domain labelled set (--held-out is read with the same options)")
    sweep.add_arguments(w)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="a release name, a clipforge/checkpoint directory or a file"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0: decode in-process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--int8", action="store_true", help="evaluate the int8 inference copy of the model")
    p.add_argument("--cache-dir", default="", help="cache features here (default: no cache)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        metavar="N",
        help="leave out (and count) images with more pixels, undecoded (default 64,000,000; 0: no limit)",
    )
    p.add_argument("--json", default="", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true")


def _data_args(p: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    p.add_argument(flag, required=True, help=help_text)
    p.add_argument("--format", choices=["auto", "webdataset", "folder", "csv"], default="auto")
    p.add_argument("--label-key", default="label", help="json field (or 'cls'), or CSV column, of the label")
    p.add_argument("--caption-key", default="txt", help="caption member ('txt', 'json:FIELD') or CSV column")
    p.add_argument("--image-key", default="filepath", help="CSV column of image paths")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the first N images only")


def run(args: argparse.Namespace) -> int:
    from clipforge.evaluate.cache import FeatureCache
    from clipforge.evaluate.prompts import load_prompts
    from clipforge.evaluate.report import results_table, write_confusion_csv, write_json
    from clipforge.evaluate.tasks import Evaluator, TaskConfig, run_task

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    task = TaskConfig(
        kind=args.kind,
        data=getattr(args, "data", "") or getattr(args, "test", ""),
        train=getattr(args, "train", ""),
        format=args.format,
        classes=getattr(args, "classes", ""),
        templates=getattr(args, "templates", ""),
        label_key=args.label_key,
        caption_key=args.caption_key,
        image_key=args.image_key,
        max_samples=args.max_samples,
        layer=getattr(args, "layer", ""),
        val_fraction=getattr(args, "val_fraction", 0.2),
        seed=getattr(args, "seed", 0),
    )
    cache = FeatureCache(args.cache_dir) if args.cache_dir else None
    settings = {"batch_size": args.batch_size, "workers": args.workers, "device": args.device}
    settings["max_image_pixels"] = args.max_image_pixels
    try:
        if args.max_image_pixels is not None and args.max_image_pixels < 0:
            raise ValueError(f"--max-image-pixels must be >= 0, got {args.max_image_pixels}")
        evaluator = Evaluator.load(
            args.model, int8=args.int8, cache=cache, progress=not args.no_progress, **settings
        )
        result = run_task(evaluator, task, confusion=bool(getattr(args, "confusion", "")))
    except (OSError, ValueError) as e:
        print(f"clipforge eval {args.kind}: {e}", file=sys.stderr)
        return 2
    print(f"{result.name}: {result.details['n']} images ({skipped_summary(result.details)})")
    print(results_table([result]))
    if getattr(args, "confusion", ""):
        names = load_prompts(task.classes).classnames
        write_confusion_csv(args.confusion, result.result.confusion, names)
        print(f"confusion matrix: {args.confusion}")
    if args.json:
        write_json(args.json, {"model": args.model, **result.as_dict()})
        print(f"results: {args.json}")
    return 0


def skipped_summary(details: dict) -> str:
    """How many samples a task left out, and why: "3 skipped: 2 corrupt_image, 1 too_large"."""
    by_reason = {reason: n for reason, n in details.get("skipped_by_reason", {}).items() if n}
    if not by_reason:
        return f"{details['skipped']} skipped"
    return f"{details['skipped']} skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items()))


def run_suite_command(args: argparse.Namespace) -> int:
    from clipforge.configs import ConfigError
    from clipforge.evaluate.report import results_table
    from clipforge.evaluate.suite import load_suite, run_suite

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        suite = load_suite(args.suite)
        suite.model = args.model or suite.model
        suite.out_dir = args.out or suite.out_dir
        suite.cache_dir = args.cache_dir or suite.cache_dir
        suite.cache = suite.cache and not args.no_cache
        suite.device = args.device or suite.device
        suite.int8 = suite.int8 or args.int8
        outcome = run_suite(suite, progress=not args.no_progress)
    except (ConfigError, OSError, ValueError) as e:
        print(f"clipforge eval suite: {e}", file=sys.stderr)
        return 2
    for result in outcome.results:
        print(f"{result.name}: {result.details['n']} images ({skipped_summary(result.details)})")
    print(results_table(outcome.results))
    print(f"feature cache: {outcome.cache_hits} hits, {outcome.cache_misses} misses")
    print(f"report: {outcome.out_dir}/results.md, results.json, results.png")
    return 0
