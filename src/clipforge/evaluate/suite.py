"""Evaluation suites: many tasks on one model from a TOML file, with cached features and a report.

    model = "runs/pictext-tiny/step-00000400"   # anything clipforge.load() takes
    out_dir = "runs/pictext-tiny/eval"          # results.md, results.json, results.png
    cache_dir = ""                              # "" = $CLIPFORGE_CACHE/features
    batch_size = 256
    workers = 2
    device = "cpu"

    [[task]]
    kind = "zeroshot"
    name = "emoji zero-shot"
    data = "../shared/data/pictext/eval-emoji-twitter.tar"
    classes = "../shared/data/pictext/classes-emoji.json"

    [[task]]
    kind = "retrieval"
    data = "../shared/data/pictext/eval-emoji-twitter.tar"
    caption_key = "json:label"

Each [[task]] table takes the fields of `TaskConfig`. Relative paths are relative to the directory the
command runs in. Image features are cached by content (see `cache`), so a second run of the suite, or
another suite sharing a data set, encodes nothing again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipforge.configs import ConfigError, load_toml
from clipforge.evaluate.cache import FeatureCache, default_cache_dir
from clipforge.evaluate.report import plot_results, results_table, write_json
from clipforge.evaluate.tasks import Evaluator, TaskConfig, TaskResult, run_task


@dataclass
class SuiteConfig:
    model: str = ""
    out_dir: str = "eval-results"
    cache_dir: str = ""  # "" = $CLIPFORGE_CACHE/features
    cache: bool = True
    batch_size: int = 256
    workers: int = 2
    device: str = "cpu"
    int8: bool = False  # evaluate the opt-in int8 inference copy of the model (models/int8.py)
    task: list[TaskConfig] = field(default_factory=list)


@dataclass
class SuiteResult:
    results: list[TaskResult]
    out_dir: Path
    cache_hits: int
    cache_misses: int


def load_suite(path: str | Path) -> SuiteConfig:
    suite = load_toml(SuiteConfig, path)
    if not suite.task:
        raise ConfigError(f"{path}: no [[task]] tables")
    return suite


def run_suite(suite: SuiteConfig, evaluator: Evaluator | None = None, progress: bool = False) -> SuiteResult:
    """Run every task on `suite.model` (or on `evaluator`'s model) and write the report to `out_dir`."""
    cache = FeatureCache(suite.cache_dir or default_cache_dir()) if suite.cache else None
    if evaluator is None:
        if not suite.model:
            raise ConfigError("the suite names no model: set `model` or pass --model")
        settings = {"batch_size": suite.batch_size, "workers": suite.workers, "device": suite.device}
        evaluator = Evaluator.load(suite.model, int8=suite.int8, cache=cache, progress=progress, **settings)
    elif evaluator.cache is None:
        evaluator.cache = cache
    results = []
    for task in suite.task:
        start = time.perf_counter()
        result = run_task(evaluator, task)
        result.details["seconds"] = round(time.perf_counter() - start, 3)
        results.append(result)
    out_dir = Path(suite.out_dir)
    write_report(results, out_dir, {"model": suite.model, "suite": asdict(suite)})
    hits, misses = (evaluator.cache.hits, evaluator.cache.misses) if evaluator.cache else (0, 0)
    return SuiteResult(results, out_dir, hits, misses)


def write_report(results: list[TaskResult], out_dir: Path, header: dict) -> None:
    """results.md (a markdown table), results.json (everything) and results.png (a bar chart)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"# Evaluation of {header.get('model') or 'the model'}\n\n"
    (out_dir / "results.md").write_text(title + results_table(results, markdown=True), encoding="utf-8")
    write_json(out_dir / "results.json", {**header, "results": [r.as_dict() for r in results]})
    plot_results(results, out_dir / "results.png")
