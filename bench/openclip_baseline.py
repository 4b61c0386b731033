"""The OpenCLIP baseline: OpenCLIP's own trainer on our pictext recipe, evaluated by our protocol.

Trains `open_clip_train.main` (in this process) on the data and budget of a clipforge recipe
(default configs/pictext-tiny.toml: ViT-Mini-8-64, 16,778 pairs, batch 128, 600 steps, warmup 60, lr 5e-4,
wd 0.2, fp32, 2 workers, seed 0), converts its final checkpoint to clipforge (OpenCLIP's CLIP keeps
OpenAI's key layout, so the state dict loads strictly), then runs the tasks of configs/eval-pictext.toml
through clipforge's evaluation code, exactly as `clipforge eval suite` would.

Runs in the side environment that has open_clip_torch (+ webdataset, braceexpand, pandas); clipforge is
imported from this checkout's src/. bench/setup_env.sh makes that environment (the reference
environment of docs/parity.md); from the repository root:

    $CLIPFORGE_BENCH_ENV/bin/python bench/openclip_baseline.py                 # the full run
    $CLIPFORGE_BENCH_ENV/bin/python bench/openclip_baseline.py --steps 6 --batch-size 32 --warmup 2 \\
        --eval-max-samples 200 --out runs/openclip-smoke --overwrite        # a smoke test

Writes OUT/results.json (metrics, samples seen, wall times, the OpenCLIP arguments), OUT/results.md,
OUT/model/ (a clipforge directory: `clipforge eval suite configs/eval-pictext.toml --model OUT/model`),
OUT/openclip-final.safetensors (OpenCLIP's weights, OpenAI layout) and OUT/openclip/ (OpenCLIP's logs
and checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# The vocabulary file where the Makefile points clipforge; an explicit setting wins.
os.environ.setdefault("CLIPFORGE_BPE_PATH", str(REPO.parent / "shared/assets/bpe_simple_vocab_16e6.txt.gz"))

sys.path.insert(0, str(REPO))
import clipforge  # noqa: E402
from bench.openclip_recipe import (  # noqa: E402
    RUN_NAME,
    Plan,
    make_plan,
    openclip_argv,
    openclip_model_config,
    repo_path,
)
from clipforge.checkpoints import load_model  # noqa: E402
from clipforge.evaluate import Evaluator, FeatureCache, TaskConfig, TaskResult, load_suite, run_task  # noqa: E402
from clipforge.evaluate.cache import default_cache_dir  # noqa: E402
from clipforge.evaluate.report import results_table  # noqa: E402
from clipforge.train.optim import WarmupCosine  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(REPO / "configs/pictext-tiny.toml"), help="recipe to match")
    p.add_argument("--suite", default=str(REPO / "configs/eval-pictext.toml"), help="clipforge eval suite")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    budget.add_argument("--samples", type=int, help="samples to train on, a multiple of the batch size")
    p.add_argument("--epochs", type=int, default=1, help="OpenCLIP epochs, the steps split evenly over them")
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--warmup", type=int, help="warmup steps (default: the recipe's)")
    p.add_argument("--workers", type=int, help="data loader workers (default: the recipe's)")
    p.add_argument("--seed", type=int, help="default: the recipe's")
    p.add_argument("--resampled", action="store_true", help="OpenCLIP's --dataset-resampled (see docs)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--eval-max-samples", type=int, default=0, help="evaluate on the first N images (0: all)")
    p.add_argument("--out", default=str(REPO / "runs/openclip-baseline"), help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    return p.parse_args(argv)


@dataclass
class StepLog:
    """Each optimizer step's learning rate and end time, from torch's global optimizer hook."""

    lrs: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.times.append(time.perf_counter())

    def samples_per_s(self, batch_size: int) -> float:
        """Throughput between the first and the last step: no start-up, no checkpoint writing."""
        span = self.times[-1] - self.times[0] if len(self.times) > 1 else float("nan")
        return (len(self.times) - 1) * batch_size / span


def train_openclip(plan: Plan, argv: list[str]) -> tuple[StepLog, float]:
    """Run OpenCLIP's trainer in this process; (the steps it took, wall seconds)."""
    import open_clip
    from open_clip_train.main import main as openclip_main

    config_file = plan.out / f"{plan.recipe.model.name}.json"
    config_file.write_text(json.dumps(openclip_model_config(plan.config), indent=2) + "\n")
    open_clip.add_model_config(config_file)
    steps = StepLog()
    hook = register_optimizer_step_post_hook(steps)
    start = time.perf_counter()
    try:
        status = openclip_main(argv)
    finally:
        hook.remove()
    quiet_torch_loggers()
    if status == -1:
        raise SystemExit("OpenCLIP refused to start (see its message above)")
    return steps, time.perf_counter() - start


def quiet_torch_loggers() -> None:
    # OpenCLIP set every existing logger to INFO; without this torch dumps dynamo statistics at exit.
    for name in list(logging.root.manager.loggerDict):
        if name == "torch" or name.startswith("torch."):
            logging.getLogger(name).setLevel(logging.WARNING)


def check_steps(plan: Plan, steps: StepLog) -> float:
    """Fail unless OpenCLIP took exactly the planned steps; the largest gap to clipforge's schedule."""
    if len(steps.lrs) != plan.steps:
        raise SystemExit(f"OpenCLIP took {len(steps.lrs)} optimizer steps, not {plan.steps}")
    schedule = WarmupCosine(plan.recipe.optim.lr, plan.warmup, plan.steps, plan.recipe.schedule.final_lr)
    return max(abs(lr - schedule(i)) for i, lr in enumerate(steps.lrs))


def last_log_line(plan: Plan) -> str:
    """OpenCLIP's last progress line: it states the samples seen out of the epoch's total."""
    lines = (plan.out / RUN_NAME / "out.log").read_text().splitlines()
    return next((line for line in reversed(lines) if "Train Epoch" in line), "")


def final_state_dict(plan: Plan) -> dict[str, torch.Tensor]:
    """The model weights of OpenCLIP's last checkpoint, `module.` prefix stripped."""
    path = plan.out / RUN_NAME / "checkpoints" / f"epoch_{plan.epochs}.pt"
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "logit_bias" in sd or "text_projection" not in sd:
        raise SystemExit(f"{path}: not a CLIP state dict in OpenAI's layout")
    return sd


def convert(plan: Plan, sd: dict[str, torch.Tensor]) -> tuple[clipforge.CLIP, Path]:
    """Save OpenCLIP's weights as safetensors, load them strictly into clipforge, save a model directory."""
    from safetensors.torch import save_file

    weights = plan.out / "openclip-final.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, weights)
    model = load_model(plan.config, pretrained=weights)  # strict: every key and shape must match
    model_dir = clipforge.save(model, plan.out / "model", clipforge.get_tokenizer())
    return model, model_dir


@torch.no_grad()
def conversion_error(model_name: str, sd: dict[str, torch.Tensor], model: clipforge.CLIP) -> float:
    """Largest difference between OpenCLIP's and clipforge's features of the same weights and inputs."""
    import open_clip

    reference = open_clip.create_model(model_name, precision="fp32").eval()
    reference.load_state_dict(sd, strict=True)
    generator = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    images = torch.randn(4, 3, size, size, generator=generator)
    texts = ["grinning face", "a red apple", "flag: Japan", "man in tuxedo"]
    tokens = clipforge.get_tokenizer()(texts, context_length=model.context_length, truncate=True)
    gaps = [
        (reference.encode_image(images) - model.encode_image(images)).abs().max(),
        (reference.encode_text(tokens) - model.encode_text(tokens)).abs().max(),
    ]
    return float(max(gaps))


def suite_tasks(suite_path: str, max_samples: int) -> list[TaskConfig]:
    """The suite's tasks with repository-relative paths made absolute, optionally on fewer images."""
    tasks = load_suite(suite_path).task
    return [
        dataclasses.replace(
            t, data=repo_path(t.data), train=repo_path(t.train), max_samples=max_samples or t.max_samples,
            classes=repo_path(t.classes) if t.classes.endswith(".json") else t.classes,
        )
        for t in tasks
    ]  # fmt: skip


def evaluate(plan: Plan, model_dir: Path, suite_path: str, max_samples: int) -> list[TaskResult]:
    """`clipforge eval suite`'s path: Evaluator.load on the model directory, then run_task per task."""
    suite = load_suite(suite_path)
    cache = FeatureCache(suite.cache_dir or default_cache_dir()) if suite.cache else None
    device = plan.device if plan.device == "cuda" else suite.device
    evaluator = Evaluator.load(
        str(model_dir), cache=cache, batch_size=suite.batch_size, workers=suite.workers, device=device
    )
    return [run_task(evaluator, task) for task in suite_tasks(suite_path, max_samples)]


def headline(results: list[TaskResult]) -> dict[str, float]:
    """The comparison numbers: zero-shot with the bare class name, retrieval over the class names."""
    zeroshot = next(r for r in results if r.kind == "zeroshot" and _task(r)["templates"] == "identity")
    retrieval = next(r for r in results if r.kind == "retrieval" and _task(r)["caption_key"] == "json:label")
    return {
        "zeroshot_top1": zeroshot.metrics["top1"],
        "zeroshot_top5": zeroshot.metrics["top5"],
        "image_to_text_R@1": retrieval.metrics["i2t_R@1"],
        "text_to_image_R@1": retrieval.metrics["t2i_R@1"],
    }  # fmt: skip


def _task(result: TaskResult) -> dict[str, Any]:
    return result.details["task"]


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"open_clip_torch": version("open_clip_torch"), "torch": torch.__version__}


def write_report(plan: Plan, record: dict[str, Any], results: list[TaskResult]) -> None:
    record["eval"] = [r.as_dict() for r in results]
    (plan.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (plan.out / "results.md").write_text(
        "# OpenCLIP baseline, evaluated by clipforge\n\n" + results_table(results, markdown=True)
    )


def print_summary(record: dict[str, Any]) -> None:
    rows = [(name, f"{100 * value:.2f}%") for name, value in record["metrics"].items()]
    speed, steady = record["train_samples_per_s"], record["train_steady_samples_per_s"]
    rows += [
        ("optimizer steps", str(record["steps"])),
        ("samples seen", f"{record['samples_seen']:,}"),
        ("train wall time", f"{record['train_wall_s']:.0f} s ({speed:.1f} samples/s overall)"),
        ("train speed between first and last step", f"{steady:.1f} samples/s"),
        ("eval wall time", f"{record['eval_wall_s']:.0f} s"),
        ("max |lr - clipforge schedule|", f"{record['lr_gap_to_clipforge_schedule']:.1e}"),
        ("max |OpenCLIP - clipforge features|", f"{record['conversion_max_abs_diff']:.1e}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))


def prepare_out(plan: Plan, overwrite: bool) -> None:
    # OpenCLIP refuses to log into an existing experiment; say so before any work is done.
    if (plan.out / RUN_NAME).exists():
        if not overwrite:
            raise SystemExit(f"{plan.out / RUN_NAME} exists: pass --overwrite or another --out")
        shutil.rmtree(plan.out / RUN_NAME)
    plan.out.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    prepare_out(plan, args.overwrite)
    openclip_args = openclip_argv(plan)
    steps, train_wall = train_openclip(plan, openclip_args)
    lr_gap = check_steps(plan, steps)
    sd = final_state_dict(plan)
    model, model_dir = convert(plan, sd)
    start = time.perf_counter()
    results = evaluate(plan, model_dir, args.suite, args.eval_max_samples)
    eval_wall = time.perf_counter() - start
    record = {
        "metrics": headline(results),
        "steps": len(steps.lrs),
        "samples_seen": len(steps.lrs) * plan.batch_size,
        "train_wall_s": round(train_wall, 1),
        "train_samples_per_s": len(steps.lrs) * plan.batch_size / train_wall,
        "train_steady_samples_per_s": steps.samples_per_s(plan.batch_size),
        "eval_wall_s": round(eval_wall, 1),
        "eval_max_samples": args.eval_max_samples,
        "lr_gap_to_clipforge_schedule": lr_gap,
        "conversion_max_abs_diff": conversion_error(plan.recipe.model.name, sd, model),
        "openclip_last_log_line": last_log_line(plan),
        # Run in process, after open_clip.add_model_config(OUT/<model>.json) registered the architecture.
        "openclip_command": "python -m open_clip_train.main " + shlex.join(openclip_args),
        "openclip_model_config": openclip_model_config(plan.config),
        "clipforge_config": plan.config.to_dict(),
        "recipe": repo_path(args.recipe),
        "suite": repo_path(args.suite),
        "versions": versions(),
    }
    write_report(plan, record, results)
    print(results_table(results))
    print_summary(record)
    print(f"wrote {plan.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
