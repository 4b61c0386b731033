"""A clipforge training recipe as OpenCLIP's trainer command line (for bench/openclip_baseline.py).

`make_plan` reads the recipe and the baseline's overrides; `openclip_argv` spells out every setting that
matters on `open_clip_train.main`'s command line; `openclip_model_config` writes the same architecture in
OpenCLIP's model-config schema. A recipe setting that would not be reproduced is refused, not ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from clipforge.configs import load_toml, to_dict  # noqa: E402
from clipforge.models import CLIPConfig, get_config  # noqa: E402
from clipforge.train.config import TrainConfig  # noqa: E402
from clipforge.train.optim import PAPER_ADAM  # noqa: E402

RUN_NAME = "openclip"  # OpenCLIP's experiment name: logs land in OUT/openclip/


@dataclass
class Plan:
    """What to train: the recipe with the command line's overrides applied."""

    recipe: TrainConfig
    config: CLIPConfig  # the clipforge architecture the OpenCLIP model must equal
    steps: int
    epochs: int  # OpenCLIP's epochs: the steps are split evenly over them
    batch_size: int
    warmup: int
    workers: int
    seed: int
    device: str
    resampled: bool
    out: Path


def make_plan(args: argparse.Namespace) -> Plan:
    recipe = load_toml(TrainConfig, args.recipe)
    check_translatable(recipe)
    batch = args.batch_size or recipe.data.batch_size
    steps = args.steps or recipe.schedule.steps
    if args.samples:
        if args.samples % batch:
            raise SystemExit(f"--samples {args.samples} is not a multiple of the batch size {batch}")
        steps = args.samples // batch
    if steps % args.epochs:
        raise SystemExit(f"{steps} steps do not split evenly into --epochs {args.epochs}")
    workers = recipe.data.workers if args.workers is None else args.workers
    # OpenCLIP gives every worker the same number of batches, rounding the total up to a multiple.
    if workers > 1 and (steps // args.epochs) % workers:
        raise SystemExit(f"{steps} steps: OpenCLIP would round up to a multiple of {workers} (--workers)")
    return Plan(
        recipe=recipe,
        config=architecture(recipe),
        steps=steps,
        epochs=args.epochs,
        batch_size=batch,
        warmup=recipe.schedule.warmup_steps if args.warmup is None else args.warmup,
        workers=workers,
        seed=recipe.run.seed if args.seed is None else args.seed,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        resampled=args.resampled,
        out=Path(args.out).resolve(),
    )


# Recipe fields that the OpenCLIP command line below reproduces, or that do not change the trained model.
# Any other field must keep its default (fp32, augmentation on, final lr 0, CLIP's loss, no patch dropout...).
TRANSLATED = (
    "model.name", "data.source", "data.path", "data.batch_size", "data.workers", "data.context_length",
    "data.crop_scale", "optim.", "schedule.steps", "schedule.warmup_steps", "eval.", "run.seed",
    "run.out_dir", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.progress",
    "run.threads", "run.device", "run.max_bad_steps",
)  # fmt: skip


def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    items: dict[str, Any] = {}
    for key, value in table.items():
        items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return items


def check_translatable(recipe: TrainConfig) -> None:
    """Refuse a recipe that the OpenCLIP command line would silently not reproduce."""
    if recipe.data.source != "webdataset":
        raise SystemExit(f"data.source is {recipe.data.source!r}: only webdataset shards are translated")
    defaults = flat(to_dict(TrainConfig()))
    changed = [key for key, value in flat(to_dict(recipe)).items() if value != defaults[key]]
    untranslated = [key for key in changed if not key.startswith(TRANSLATED)]
    if untranslated:
        raise SystemExit("recipe settings OpenCLIP is not given here: " + ", ".join(untranslated))


def architecture(recipe: TrainConfig) -> CLIPConfig:
    """The recipe's model at the recipe's context length, as `clipforge train` builds it."""
    config = get_config(recipe.model.name)
    text = dataclasses.replace(config.text, context_length=recipe.data.context_length)
    return dataclasses.replace(config, text=text)


def openclip_model_config(config: CLIPConfig) -> dict[str, Any]:
    """The same architecture in OpenCLIP's model-config schema (ViT image tower only)."""
    v, t = config.vision, config.text
    if v.kind != "vit":
        raise SystemExit("only ViT image towers are translated to OpenCLIP configs here")
    return {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.activation == "quick_gelu",
        # OpenCLIP derives the image tower's head count as width // head_width.
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                       "head_width": v.width // v.heads, "layers": v.layers, "mlp_ratio": v.mlp_ratio},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
    }  # fmt: skip


def repo_path(value: str) -> str:
    """Recipes and suites name paths relative to the repository root; make them absolute."""
    return value if not value or os.path.isabs(value) else os.path.normpath(REPO / value)


def adam_settings(recipe: TrainConfig) -> tuple[float, ...]:
    """The recipe's Adam betas and eps; unset ones are the paper's for a ViT, as `clipforge train` does."""
    chosen = (recipe.optim.beta1, recipe.optim.beta2, recipe.optim.eps)
    return tuple(default if c is None else c for default, c in zip(PAPER_ADAM["vit"], chosen, strict=True))


def openclip_argv(plan: Plan) -> list[str]:
    """OpenCLIP's command line for the plan: every setting that matters is spelled out."""
    r = plan.recipe
    beta1, beta2, eps = adam_settings(r)
    low, high = r.data.crop_scale
    argv = [
        "--model", r.model.name,
        "--train-data", repo_path(r.data.path),
        "--dataset-type", "webdataset",
        "--train-num-samples", str(plan.steps // plan.epochs * plan.batch_size),
        "--epochs", str(plan.epochs),
        "--batch-size", str(plan.batch_size),
        "--workers", str(plan.workers),
        "--lr", str(r.optim.lr),
        "--wd", str(r.optim.weight_decay),
        "--beta1", str(beta1),
        "--beta2", str(beta2),
        "--eps", str(eps),
        "--warmup", str(plan.warmup),
        "--lr-scheduler", "cosine",
        "--precision", "fp32",
        "--aug-cfg", f"scale=({low},{high})",  # OpenCLIP's default too: random resized crop, 0.9-1.0
        "--device", plan.device,
        "--seed", str(plan.seed),
        "--log-every-n-steps", str(r.run.log_every),
        "--logs", str(plan.out),
        "--name", RUN_NAME,
    ]  # fmt: skip
    if r.optim.grad_clip > 0:
        argv += ["--grad-clip-norm", str(r.optim.grad_clip)]
    return [*argv, "--dataset-resampled"] if plan.resampled else argv
