"""Learning ablations: one recipe, one lever changed at a time, each run trained and then evaluated
by the same protocol as the OpenCLIP baseline (bench/openclip_baseline.py).

    python -m bench.learning --steps 300 --variants base sigmoid "best=--optim.lr 1e-3 --loss.name sigmoid"
    python -m bench.learning --table-only --out runs/ablations --table docs/results/learning-ablations.md
    python -m bench.learning --plot docs/results/learning-curves.png \
        --curves "ours=runs/pictext-best/metrics.jsonl" "OpenCLIP=runs/openclip-baseline/openclip/out.log"

Each run is `clipforge train RECIPE <the variant's flags>` followed by
`clipforge eval suite configs/eval-pictext.toml` on its last checkpoint. A run whose results already exist
is not repeated, so the command can be stopped and started again; `--table-only` just collects them.
Runs go one after another: they would only slow each other down on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from clipforge.train.ema import EMA_DIR

ROOT = Path(__file__).resolve().parents[1]

# name -> flags changed from the recipe. Each is one lever, alone.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "sigmoid": ["--loss.name", "sigmoid"],  # SigLIP: per-pair sigmoid, t=10, b=-10 at the start
    "patch-dropout-0.5": ["--model.patch_dropout", "0.5"],  # FLIP: half the patches, ~1.6x faster steps
    "lr-1e-3": ["--optim.lr", "1e-3"],
    "lr-2e-3": ["--optim.lr", "2e-3"],
    "wd-0.05": ["--optim.weight_decay", "0.05"],
    "wd-0.5": ["--optim.weight_decay", "0.5"],
    "crop-0.5": ["--data.crop_scale", "0.5,1.0"],  # stronger augmentation: crops of 50-100% of the area
    "no-augment": ["--data.augment", "false"],  # OpenAI's eval resize + center crop only
    "context-16": ["--data.context_length", "16"],  # captions average 6 words; 16 tokens cuts few
    "temperature-fixed": ["--loss.learn_temperature", "false"],  # 1/0.07 throughout
    "temperature-0.03": ["--loss.init_temperature", "0.03"],  # start sharper (scale 33)
    "ema-0.99": ["--optim.ema", "0.99"],  # evaluate a moving average of the weights
    "bf16": ["--run.precision", "bf16"],  # autocast: fast on CPUs with native bf16 (avx512_bf16, AMX)
}

# OpenCLIP's training log line: "Train Epoch: 0 [ 1408/76800 (2%)] ... Loss: 4.7907 (4.8872)".
OPENCLIP_LINE = re.compile(
    r"Train Epoch: (?P<epoch>\d+) \[\s*(?P<samples>\d+)/(?P<per_epoch>\d+).*?\bLoss: (?P<loss>[\d.]+)"
)

HEADLINE = {  # column -> (task name in configs/eval-pictext.toml, metric)
    "zero-shot top-1": ("emoji zero-shot", "top1"),
    "zero-shot top-5": ("emoji zero-shot", "top5"),
    "image→text R@1": ("emoji retrieval (class names)", "i2t_R@1"),
    "text→image R@1": ("emoji retrieval (class names)", "t2i_R@1"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="configs/pictext-tiny.toml")
    parser.add_argument("--suite", default="configs/eval-pictext.toml")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--warmup", type=int, help="warmup steps of every run (default: 10%% of --steps)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names, or 'name=--a.b 1 ...'")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--extra", default="", help="flags added to every run, e.g. '--data.workers 2'")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument("--table-only", action="store_true", help="collect existing results, train nothing")
    parser.add_argument("--plot", type=Path, help="draw the loss curves of --curves into this PNG, then stop")
    parser.add_argument("--curves", nargs="*", default=[], help="'label=metrics.jsonl' or 'label=out.log'")
    return parser.parse_args(argv)


def loss_curve(path: Path) -> tuple[list[float], list[float]]:
    """(samples seen, losses) from a clipforge metrics.jsonl, or from an OpenCLIP out.log."""
    if path.suffix == ".jsonl":
        batch = tomllib.loads((path.parent / "config.toml").read_text())["data"]["batch_size"]
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        points = [(r["step"] * batch, r["loss"]) for r in lines if "loss" in r]
    else:
        found = [m for line in path.read_text().splitlines() if (m := OPENCLIP_LINE.search(line))]
        # The sample count restarts with each epoch.
        seen = [int(m["epoch"]) * int(m["per_epoch"]) + int(m["samples"]) for m in found]
        points = list(zip(seen, (float(m["loss"]) for m in found), strict=True))
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(curves: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in curves:
        label, _, file = spec.partition("=")
        ax.plot(*loss_curve(Path(file)), label=label, lw=1.2)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("training loss (contrastive, per batch)")
    ax.set_title("pictext: training loss")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def variant_flags(spec: str) -> tuple[str, list[str]]:
    """'name' from VARIANTS, or 'name=--a.b 1 --c.d 2' for a combination defined on the command line."""
    name, _, flags = spec.partition("=")
    if flags:
        return name, flags.split()
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return name, VARIANTS[name]


def clipforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "clipforge", *args], cwd=ROOT, check=True)


def run_one(args: argparse.Namespace, name: str, flags: list[str], seed: int) -> Path:
    """Train and evaluate one variant with one seed, unless its results exist already."""
    run_dir = args.out / f"{name}-s{seed}"
    results = run_dir / "eval" / "results.json"
    if results.exists():
        return run_dir
    # The pictext recipe's 10% warmup at any length, unless given.
    warmup = max(1, args.steps // 10) if args.warmup is None else args.warmup
    start = time.perf_counter()
    clipforge(
        "train", args.recipe, *flags, *args.extra.split(),
        "--schedule.steps", str(args.steps), "--schedule.warmup_steps", str(warmup),
        "--run.seed", str(seed), "--run.out_dir", str(run_dir), "--run.progress", "false",
        "--run.checkpoint_every", "0", "--eval.every", "-1",
    )  # fmt: skip
    train_s = time.perf_counter() - start
    model = run_dir / f"step-{args.steps:08d}"
    model = model / EMA_DIR if (model / EMA_DIR).is_dir() else model  # with optim.ema: the average
    clipforge("eval", "suite", args.suite, "--model", str(model),
              "--out", str(run_dir / "eval"), "--no-progress")  # fmt: skip
    (run_dir / "timing.json").write_text(json.dumps({"train_s": train_s, "flags": flags}) + "\n")
    return run_dir


def scores(run_dir: Path) -> dict[str, float]:
    results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    by_task = {r["name"]: r["metrics"] for r in results}
    row = {column: by_task[task][metric] for column, (task, metric) in HEADLINE.items()}
    row["train min"] = json.loads((run_dir / "timing.json").read_text())["train_s"] / 60
    return row


def averaged(out: Path, name: str, seeds: list[int]) -> dict[str, float]:
    """A variant's scores, mean over the seeds that finished ({} if none has)."""
    runs = [scores(out / f"{name}-s{s}") for s in seeds if (out / f"{name}-s{s}" / "timing.json").exists()]
    if not runs:
        return {}
    return {k: statistics.mean(r[k] for r in runs) for k in runs[0]} | {"seeds": len(runs)}


def table(out: Path, specs: list[str], seeds: list[int]) -> str:
    """Markdown: one row per variant (mean over its finished seeds), with top-1's change from "base"."""
    flags_of = dict(variant_flags(spec) for spec in specs)
    rows = {name: row for name in flags_of if (row := averaged(out, name, seeds))}
    columns = [*HEADLINE, "train min"]
    header = ["variant", "flags", *columns, "Δ top-1 (points)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = rows.get("base", {}).get("zero-shot top-1")
    for name, row in rows.items():
        cells = [f"{row[c]:.1f}" if c == "train min" else f"{100 * row[c]:.2f}%" for c in columns]
        delta = f"{100 * (row['zero-shot top-1'] - base):+.2f}" if base is not None else ""
        flags = " ".join(flags_of[name]) or "(the recipe)"
        lines.append(f"| {name} | `{flags}` | " + " | ".join(cells) + f" | {delta} | {int(row['seeds'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot_curves(args.curves, args.plot)
        return 0
    bpe = ROOT.parent / "shared" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    if bpe.exists():
        os.environ.setdefault("CLIPFORGE_BPE_PATH", str(bpe))
    specs = [s.strip() for s in args.variants if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table_only:
        for spec in specs:
            for seed in seeds:
                run_one(args, *variant_flags(spec), seed)
                print(table(args.out, specs, seeds), flush=True)
    text = table(args.out, specs, seeds)
    print(text)
    if args.table:
        args.table.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
