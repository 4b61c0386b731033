"""Presenting results: a text/markdown table, JSON, a bar chart, and a confusion-matrix CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Metrics that are not shares of 1: printed as plain numbers and left out of the bar chart.
_PLAIN_METRICS = ("C", "mean_rank", "median_rank")


def _is_share(metric: str) -> bool:
    return not metric.endswith(_PLAIN_METRICS)


def format_value(metric: str, value: float) -> str:
    if not _is_share(metric):
        return f"{value:.4g}"
    return f"{100 * value:.2f}%"


def results_table(results: Sequence[Any], markdown: bool = False) -> str:
    """One row per (task, metric) of `TaskResult`s; aligned plain text, or a markdown table."""
    rows = [("task", "kind", "metric", "value")]
    rows += [(r.name, r.kind, m, format_value(m, v)) for r in results for m, v in r.metrics.items()]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join(["---"] * 3 + ["---:"]) + "|")
        return "\n".join(lines) + "\n"
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def plot_results(results: Sequence[Any], path: str | os.PathLike[str]) -> None:
    """A horizontal bar chart (PNG) of every share-of-1 metric, in %, one colour per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        (f"{r.name}: {m}", 100 * v, f"C{i % 10}")
        for i, r in enumerate(results)
        for m, v in r.metrics.items()
        if _is_share(m)
    ][::-1]  # top to bottom in task order
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(bars) + 1.2))
    ax.barh(range(len(bars)), [v for _, v, _ in bars], color=[c for _, _, c in bars])
    ax.set_yticks(range(len(bars)), [label for label, _, _ in bars], fontsize=8)
    top = max([v for _, v, _ in bars], default=0.0)
    for y, (_, v, _) in enumerate(bars):
        ax.text(v + top * 0.01, y, f"{v:.1f}" if top > 10 else f"{v:.2f}", va="center", fontsize=7)
    ax.set_xlim(0, min(100.0, 1.15 * top) or 1.0)  # zoomed to the results: small models score low
    ax.set_xlabel("%")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_confusion_csv(
    path: str | os.PathLike[str], confusion: torch.Tensor, classnames: Sequence[str]
) -> None:
    """Counts with a header row of predicted classes and a first column of true classes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classnames])
        for name, row in zip(classnames, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
