"""The WiSE-FT α sweep: zero-shot accuracy of (1 − α)·A + α·B on an in-domain and a held-out set.

Wortsman et al. 2022 plot, for each mixing coefficient α, the accuracy on the fine-tuning distribution
against the accuracy under distribution shift; intermediate α often beat both endpoints on the second
without losing much on the first. `sweep` evaluates each merge the way `clipforge eval zeroshot` does
(`clipforge.evaluate.tasks.run_task` on the merge's inference copy), so α = 0 and α = 1 report exactly
what evaluating A and B reports. The models are read once; each merge is made in memory.

`write_report` writes sweep.json, sweep.md and sweep.png; `add_arguments` and `run_command` are
`clipforge eval sweep` (registered in `clipforge.cli.eval`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from clipforge.finetune.merge import check_alpha, load_pair, merge_models

if TYPE_CHECKING:
    from clipforge.evaluate.tasks import TaskConfig, TaskResult

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
SETS = ("in_domain", "held_out")  # the keys of a point's results, in the report's order
TITLES = {"in_domain": "in-domain", "held_out": "held-out"}


@dataclass
class SweepPoint:
    alpha: float
    results: dict[str, TaskResult]  # "in_domain", "held_out" -> that set's evaluation


def parse_alphas(text: str, extrapolate: bool = False) -> list[float]:
    """The α of a comma-separated list ("0,0.25,1"), each checked by `check_alpha`; `ValueError` names a
    bad one, an empty list or a repeated value."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--alphas is empty: give a comma-separated list such as 0,0.5,1")
    alphas = [check_alpha(p, extrapolate) for p in parts]
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"--alphas lists a value twice: {text}")
    return alphas


def check_task(task: TaskConfig) -> None:
    """Read a zero-shot task's classes, templates and data listing (no image decoded), so a missing or
    unreadable input fails before the first model is evaluated."""
    from clipforge.evaluate.datasets import read_labelled
    from clipforge.evaluate.prompts import load_prompts, load_templates

    if task.templates:
        load_templates(task.templates)
    read_labelled(task.spec(task.data), load_prompts(task.classes).classnames)


def _model_id(ids: tuple[str, str] | None, alpha: float, int8: bool) -> str:
    """The feature-cache key of a merge: A's or B's own at the endpoints (their features are the same),
    else a hash of both and α. "" (no cache) without ids."""
    from clipforge.evaluate.cache import digest

    if ids is None:
        return ""
    if alpha in (0.0, 1.0):
        key = ids[0] if alpha == 0.0 else ids[1]
    else:
        key = digest({"wise-ft": list(ids), "alpha": alpha})
    return f"{key}-int8" if int8 else key  # as Evaluator.load names an int8 copy


def sweep(
    model_a: nn.Module,
    model_b: nn.Module,
    tokenizer: Any,
    alphas: Sequence[float],
    tasks: dict[str, TaskConfig],
    *,
    extrapolate: bool = False,
    int8: bool = False,
    model_ids: tuple[str, str] | None = None,
    **settings: Any,
) -> Iterator[SweepPoint]:
    """For each α, merge A and B in memory and run each task (`TaskConfig`s keyed by set name) on it.

    `settings` are `Evaluator`'s (batch_size, workers, device, progress, cache, max_image_pixels); with a
    cache, `model_ids` (A's and B's `model_fingerprint`) key the merges' features."""
    from clipforge.evaluate.tasks import Evaluator, run_task
    from clipforge.models import for_inference, quantize_int8

    for alpha in alphas:
        merged = merge_models(model_a, model_b, alpha, extrapolate).to(settings.get("device", "cpu"))
        model = quantize_int8(merged) if int8 else for_inference(merged)
        del merged  # the inference copy is all that is evaluated
        evaluator = Evaluator(model, tokenizer, model_id=_model_id(model_ids, alpha, int8), **settings)
        yield SweepPoint(alpha, {name: run_task(evaluator, task) for name, task in tasks.items()})


# ---- the report --------------------------------------------------------------------------------------


def as_json(points: Sequence[SweepPoint], meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` (models, tasks), then one entry per α: each set's metrics, image count and skips."""
    rows = [{"alpha": p.alpha, **{name: _summary(r) for name, r in p.results.items()}} for p in points]
    return {**meta, "points": rows}


def _summary(result: TaskResult) -> dict[str, Any]:
    return {"metrics": result.metrics, "n": result.details["n"], "skipped": result.details["skipped"]}


def markdown_table(points: Sequence[SweepPoint]) -> str:
    """One row per α, a column per (set, metric), then the α best on each set's top-1 (a tie: the smaller)."""
    from clipforge.evaluate.report import format_value

    columns = [(name, metric) for name in SETS for metric in points[0].results[name].metrics]
    header = ["α", *(f"{TITLES[name]} {metric}" for name, metric in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    for p in points:
        cells = [f"{p.alpha:g}", *(format_value(m, p.results[n].metrics[m]) for n, m in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in SETS:
        best = max(points, key=lambda p: (p.results[name].metrics["top1"], -p.alpha))
        lines.append(
            f"Best {TITLES[name]} top1: α = {best.alpha:g} ({best.results[name].metrics['top1']:.2%})."
        )
    return "\n".join(lines) + "\n"


def plot_sweep(points: Sequence[SweepPoint], path: Path, names: dict[str, str]) -> None:
    """Held-out against in-domain top-1 (%), one point per α joined in α order; points that coincide share
    one label ("α = 0.4, 0.5"), and A (α = 0) and B (α = 1) are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = [tuple(100 * p.results[n].metrics["top1"] for n in SETS) for p in points]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([x for x, _ in xy], [y for _, y in xy], "-o", color="C0", markersize=5, zorder=1)
    labels: dict[tuple[float, ...], list[str]] = {}
    for p, at in zip(points, xy, strict=True):
        labels.setdefault(at, []).append(f"{p.alpha:g}")
    for (x, y), alphas in labels.items():
        ax.annotate("α = " + ", ".join(alphas), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for alpha, marker, label in ((0.0, "*", "zero-shot (A)"), (1.0, "s", "fine-tuned (B)")):
        ends = [at for p, at in zip(points, xy, strict=True) if p.alpha == alpha]
        if ends:
            ax.scatter(
                *ends[0], marker=marker, s=120, color="C3" if alpha else "C2", label=label, zorder=3 - alpha
            )
    ax.set_xlabel(f"in-domain top-1 (%): {names['in_domain']}")
    ax.set_ylabel(f"held-out top-1 (%): {names['held_out']}")
    ax.set_title("WiSE-FT: (1 − α)·zero-shot + α·fine-tuned", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, points: Sequence[SweepPoint], meta: dict[str, Any]) -> list[Path]:
    """sweep.json, sweep.md and sweep.png in `out_dir` (created; earlier sweep files are replaced)."""
    from clipforge.evaluate.report import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sweep.json", out_dir / "sweep.md", out_dir / "sweep.png"]
    write_json(paths[0], as_json(points, meta))
    paths[1].write_text(markdown_table(points), encoding="utf-8")
    names = {name: Path(meta["tasks"][name]["data"].rstrip("/")).name for name in SETS}
    plot_sweep(points, paths[2], names)
    return paths


# ---- clipforge eval sweep ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's own flags; `clipforge.cli.eval` adds the model and data flags it shares with zeroshot."""
    p.add_argument("--fine-tuned", required=True, metavar="B", help="the fine-tuned model (alpha = 1)")
    p.add_argument("--classes", required=True, help="the in-domain class names (as eval zeroshot's)")
    p.add_argument("--templates", default="", help="the in-domain templates (as eval zeroshot's)")
    p.add_argument("--held-out", required=True, help="the held-out labelled set, read like --data")
    p.add_argument("--held-out-classes", default="", help="its class names (default: --classes)")
    p.add_argument("--held-out-templates", default=None, help="its templates (default: --templates)")
    p.add_argument(
        "--alphas",
        default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
        help="comma-separated weights of B (default 0,0.1,...,1)",
    )
    p.add_argument("--extrapolate", action="store_true", help="allow alphas outside [0, 1]")
    p.add_argument("--out", required=True, help="the directory for sweep.json, sweep.md and sweep.png")
    p.set_defaults(func=run_command)


def _tasks(args: argparse.Namespace) -> dict[str, TaskConfig]:
    from clipforge.evaluate.tasks import TaskConfig

    shared = {
        "kind": "zeroshot", "format": args.format, "label_key": args.label_key,
        "caption_key": args.caption_key, "image_key": args.image_key, "max_samples": args.max_samples,
    }  # fmt: skip
    held_out_templates = args.templates if args.held_out_templates is None else args.held_out_templates
    return {
        "in_domain": TaskConfig(
            name="in-domain", data=args.data, classes=args.classes, templates=args.templates, **shared
        ),
        "held_out": TaskConfig(
            name="held-out",
            data=args.held_out,
            classes=args.held_out_classes or args.classes,
            templates=held_out_templates,
            **shared,
        ),
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from clipforge.evaluate.cache import FeatureCache

    if args.max_image_pixels is not None and args.max_image_pixels < 0:
        raise ValueError(f"--max-image-pixels must be >= 0, got {args.max_image_pixels}")
    cache = FeatureCache(args.cache_dir) if args.cache_dir else None
    return {
        "batch_size": args.batch_size, "workers": args.workers, "device": args.device,
        "progress": not args.no_progress, "cache": cache, "max_image_pixels": args.max_image_pixels,
    }  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    """`clipforge eval sweep`: everything is checked, then every α evaluated, then the report written."""
    import logging
    from dataclasses import asdict

    from clipforge.evaluate.cache import model_fingerprint
    from clipforge.evaluate.report import write_json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        alphas = parse_alphas(args.alphas, args.extrapolate)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file: it must be a directory")
        tasks, settings = _tasks(args), _settings(args)
        for task in tasks.values():
            check_task(task)
        model_a, model_b, tokenizer = load_pair(args.model, args.fine_tuned)
        ids = (model_fingerprint(args.model), model_fingerprint(args.fine_tuned)) if args.cache_dir else None
        points = []
        for point in sweep(
            model_a, model_b, tokenizer, alphas, tasks, extrapolate=args.extrapolate, int8=args.int8,
            model_ids=ids, **settings,
        ):  # fmt: skip
            points.append(point)
            print(f"α = {point.alpha:g}: " + ", ".join(_top1(name, point) for name in SETS), flush=True)
        meta = {"model_a": args.model, "model_b": args.fine_tuned, "int8": args.int8}
        meta["tasks"] = {name: asdict(task) for name, task in tasks.items()}
        paths = write_report(out, points, meta)
        if args.json:
            write_json(args.json, as_json(points, meta))
    except (OSError, ValueError) as e:
        print(f"clipforge eval sweep: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(markdown_table(points), end="")
    print("report: " + ", ".join(str(p) for p in paths))
    return 0


def _top1(name: str, point: SweepPoint) -> str:
    result = point.results[name]
    return f"{TITLES[name]} top1 {result.metrics['top1']:.2%} ({result.details['n']} images)"
