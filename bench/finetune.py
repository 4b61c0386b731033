"""The fine-tuning recipe on pictext: fine-tune the pictext model on one emoji style, then measure the
same style, another style and the held-out Twitter style for plain fine-tuning, FLYP and LiT, each
merged back with the zero-shot model at several WiSE-FT weights.

    python -m bench.finetune --base runs/pictext-tiny/step-00000600 --out runs/finetune-pictext \
        --report docs/results/finetune-pictext

Steps (each skipped when its output exists, so the command can be stopped and started again):
1. split the training shards' emoji by style into `OUT/data/`: the Google style by class (a hash of the
   class name puts 70% of the classes in `google-train-{0..3}.tar`, with every skin-tone variant; the other
   classes' plain images form `google-test.tar`), and OpenMoji's plain images of the evaluation's classes
   (`openmoji-test.tar`);
2. fine-tune: `clipforge finetune configs/finetune-pictext-classify.toml` (plain), `clipforge train
   configs/finetune-pictext-flyp.toml` (FLYP) and the same with `--model.lock_image true` (LiT);
3. for each, the WiSE-FT merges (1 − α)·base + α·fine-tuned at `--alphas`, evaluated zero-shot over the
   1,910 class names on the three sets; results.json, results.md and results.png in `--report`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.shards import add, samples

RECIPES = Path(__file__).resolve().parents[1] / "configs"
SETS = {  # set name -> (title, file under OUT/data, or the pictext file)
    "in_domain": ("Google (fine-tuned style, unseen emoji)", "google-test.tar"),
    "other_style": ("OpenMoji (other training style)", "openmoji-test.tar"),
    "twitter": ("Twitter (style never trained on)", "eval-emoji-twitter.tar"),
}
TRAIN_FRACTION = 0.7
TRAIN_SHARDS = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="runs/pictext-tiny/step-00000600", help="the zero-shot model")
    p.add_argument("--pictext", default="../shared/data/pictext", help="the pictext corpus")
    p.add_argument("--out", default="runs/finetune-pictext", help="split shards and fine-tuned runs")
    p.add_argument("--report", default="runs/finetune-pictext/report", help="results.{json,md,png}")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


# ---- 1. the split -------------------------------------------------------------------------------------


def _is_train_class(label: str) -> bool:
    """A fixed 70/30 split of the classes, the same on every machine (not Python's salted hash)."""
    return int(hashlib.sha256(label.encode()).hexdigest()[:8], 16) / 16**8 < TRAIN_FRACTION


def _destination(meta: dict[str, Any], classes: set[str]) -> str | None:
    style, label, plain = meta.get("style"), meta.get("label"), meta.get("skin") is None
    if meta.get("source") != "emoji" or label not in classes:
        return None
    if style == "google":
        return "google-train" if _is_train_class(label) else ("google-test.tar" if plain else None)
    return "openmoji-test.tar" if style == "openmoji" and plain else None


def split_shards(pictext: Path, out: Path) -> dict[str, int]:
    """Write the three sets (each file renamed into place when complete); returns their sizes."""
    classes = set(json.loads((pictext / "classes-emoji.json").read_text()))
    names = [*(f"google-train-{i}.tar" for i in range(TRAIN_SHARDS)), "google-test.tar", "openmoji-test.tar"]
    out.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(names, 0)
    with contextlib.ExitStack() as stack:
        tars = {name: stack.enter_context(tarfile.open(out / f"{name}.partial", "w")) for name in names}
        for shard in sorted(pictext.glob("train-*.tar")):
            for key, members in samples(shard):
                name = _destination(json.loads(members["json"]), classes)
                if name == "google-train":  # dealt round the shards: one per data-loading worker
                    name = f"google-train-{sum(counts[n] for n in names[:TRAIN_SHARDS]) % TRAIN_SHARDS}.tar"
                if name is not None:
                    counts[name] += 1
                    add(tars[name], key, members)
    for name in names:
        (out / f"{name}.partial").rename(out / name)
    return counts


# ---- 2. fine-tuning -----------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path) -> float:
    """Run a clipforge command with its output in `log`; its wall-clock seconds."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{cmd[1]} {cmd[2]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def commands(args: argparse.Namespace, data: Path) -> dict[str, tuple[list[str], Path]]:
    """{method: (its clipforge command, the fine-tuned model it writes)}."""
    clipforge, out = str(Path(sys.executable).parent / "clipforge"), Path(args.out)
    classes = f"--data.classes={Path(args.pictext) / 'classes-emoji.json'}"
    train, test = data / f"google-train-{{0..{TRAIN_SHARDS - 1}}}.tar", data / "google-test.tar"
    classify = [
        str(RECIPES / "finetune-pictext-classify.toml"),
        f"--model={args.base}",
        f"--data.train={train}",
    ]
    classify += [f"--out_dir={out / 'classify'}", f"--data.eval={test}", classes]
    flyp = [
        str(RECIPES / "finetune-pictext-flyp.toml"),
        f"--model.pretrained={args.base}",
        f"--data.path={train}",
    ]
    flyp += [f"--eval.data={test}", classes, classes.replace("--data.", "--eval.")]
    return {
        "fine-tune": ([clipforge, "finetune", *classify], out / "classify" / "model"),
        "FLYP": (
            [clipforge, "train", *flyp, f"--run.out_dir={out / 'flyp'}"],
            out / "flyp" / "step-00000300",
        ),
        "LiT": (
            [clipforge, "train", *flyp, f"--run.out_dir={out / 'lit'}", "--model.lock_image=true"],
            out / "lit" / "step-00000300",
        ),
    }


def finetune_all(args: argparse.Namespace, data: Path) -> dict[str, dict[str, Any]]:
    """{method: {"model": its fine-tuned model, "seconds": wall-clock}}, training what is missing."""
    methods = {}
    for method, (cmd, model) in commands(args, data).items():
        timing = model.parent / "wall-clock.json"
        if not (model.exists() and timing.exists()):
            seconds = _run(cmd, Path(args.out) / f"{method}.log")
            timing.write_text(json.dumps({"seconds": seconds}))
        methods[method] = {"model": str(model), **json.loads(timing.read_text())}
    return methods


# ---- 3. WiSE-FT and the report ------------------------------------------------------------------------


def evaluate(args: argparse.Namespace, model_b: str, tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-1 on each set at each α of the merge of the base (α = 0) and `model_b` (α = 1)."""
    from clipforge.finetune.merge import load_pair
    from clipforge.finetune.sweep import parse_alphas, sweep

    model_a, model_b, tokenizer = load_pair(args.base, model_b)
    settings = {"batch_size": 256, "workers": args.workers, "progress": False}
    points = []
    for point in sweep(model_a, model_b, tokenizer, parse_alphas(args.alphas), tasks, **settings):
        top1 = {name: result.metrics["top1"] for name, result in point.results.items()}
        print(f"  α = {point.alpha:g}: " + ", ".join(f"{k} {v:.2%}" for k, v in top1.items()), flush=True)
        points.append(
            {"alpha": point.alpha, "top1": top1, "n": {k: r.details["n"] for k, r in point.results.items()}}
        )
    return points


def markdown(results: dict[str, Any]) -> str:
    header = "| method | α | " + " | ".join(title for title, _ in SETS.values()) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(SETS)]
    for method, entry in results["methods"].items():
        for point in entry["points"]:
            cells = [f"{100 * point['top1'][name]:.2f}" for name in SETS]
            lines.append(f"| {method} | {point['alpha']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """In-domain top-1 against each shifted set's, one line per method through its α (0 = the base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, shifted in zip(axes, ("other_style", "twitter"), strict=True):
        for i, (method, entry) in enumerate(results["methods"].items()):
            xs = [100 * p["top1"]["in_domain"] for p in entry["points"]]
            ys = [100 * p["top1"][shifted] for p in entry["points"]]
            ax.plot(xs, ys, "-o", color=f"C{i}", markersize=4, label=f"{method} (α = 0 … 1)")
            ax.scatter(xs[-1], ys[-1], marker="s", s=60, color=f"C{i}")
        first = next(iter(results["methods"].values()))["points"][0]
        ax.scatter(100 * first["top1"]["in_domain"], 100 * first["top1"][shifted], marker="*", s=220,
                   color="k", zorder=5, label="zero-shot base")  # fmt: skip
        ax.set_xlabel(f"top-1 (%): {SETS['in_domain'][0]}")
        ax.set_ylabel(f"top-1 (%): {SETS[shifted][0]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fine-tuning on the Google emoji style, WiSE-FT merged with the base (squares: α = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from clipforge.evaluate.tasks import TaskConfig

    args = parse_args(argv)
    pictext, data = Path(args.pictext), Path(args.out) / "data"
    if not (Path(args.base) / "config.json").is_file():
        sys.exit(f"--base {args.base} is not a model directory: train it with `make pictext` first")
    if not (data / "openmoji-test.tar").exists():
        print("split:", split_shards(pictext, data), flush=True)
    methods = finetune_all(args, data)
    files = {name: data / file for name, (_, file) in SETS.items()}
    files["twitter"] = pictext / SETS["twitter"][1]
    classes = str(pictext / "classes-emoji.json")
    tasks = {
        name: TaskConfig(kind="zeroshot", name=name, data=str(f), classes=classes)
        for name, f in files.items()
    }
    for method, entry in methods.items():
        print(f"{method}: WiSE-FT with {entry['model']}", flush=True)
        entry["points"] = evaluate(args, entry["model"], tasks)
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    results = {"base": args.base, "sets": {k: t[0] for k, t in SETS.items()}, "methods": methods}
    results["tasks"] = {name: asdict(task) for name, task in tasks.items()}
    (report / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (report / "results.md").write_text(markdown(results))
    plot(results, report / "results.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
