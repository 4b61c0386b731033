"""Zero-shot evaluation during training, on the set `[eval]` names, with the evaluation module's code.

Which set (`eval.data`):
- "auto" (the default): the synthetic held-out set when training on synthetic data, else none -- a
  score on pictures unlike the training data would say nothing about the run;
- "synthetic": the held-out colour-shape pairs of the built-in set (200 pictures, drawn once);
- anything else: a labelled set `clipforge eval zeroshot` reads (tar shards, a class-folder tree, a
  CSV), with `eval.classes` naming the classes. Only the list of images is kept; each evaluation
  streams them through a DataLoader in batches, so memory does not grow with the set. Images that
  cannot be used are left out and counted, as in `clipforge eval`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from clipforge.evaluate.datasets import DataSpec, read_labelled
from clipforge.evaluate.prompts import load_prompts, load_templates
from clipforge.evaluate.tasks import Evaluator
from clipforge.evaluate.zeroshot import accuracy_report, build_classifier, zeroshot_logits
from clipforge.train.config import TrainConfig

log = logging.getLogger(__name__)

Evaluate = Callable[[torch.nn.Module], dict[str, float]]


def eval_set(cfg: TrainConfig) -> str:
    """The set training evaluates on: "synthetic", a path, or "" for none."""
    if cfg.eval.every < 0:
        return ""
    if cfg.eval.data == "auto":
        return "synthetic" if cfg.data.source == "synthetic" else ""
    return cfg.eval.data


def make_evaluator(cfg: TrainConfig, tokenizer, image_size: int, device: torch.device) -> Evaluate | None:
    """A function model -> {"top1", "top5", "mean_per_class"}, or None when there is nothing to evaluate."""
    which = eval_set(cfg)
    if not which:
        if cfg.eval.every >= 0:
            log.info(
                "no evaluation configured: training on %s data; set [eval] data to evaluate", cfg.data.source
            )
        return None

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, context_length=cfg.data.context_length, truncate=True)

    if which == "synthetic":
        score = _synthetic(cfg, tokenize, image_size, device)
    else:
        score = _labelled(cfg, tokenizer, device)

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return score(model)
        finally:
            model.train(was_training)

    return evaluate


def _synthetic(cfg: TrainConfig, tokenize, image_size: int, device: torch.device) -> Evaluate:
    from clipforge.data.synthetic import TEMPLATES, synthetic_zeroshot_set

    heldout = synthetic_zeroshot_set(n_per_class=25, image_size=image_size, seed=10_000 + cfg.run.seed)
    templates = load_templates(cfg.eval.templates) if cfg.eval.templates else list(TEMPLATES)

    def score(model: torch.nn.Module) -> dict[str, float]:
        classifier = build_classifier(
            model, tokenize, heldout.classnames, templates, cfg.eval.batch_size, device
        )
        logits = torch.cat(
            [
                zeroshot_logits(model.encode_image(images.to(device)), classifier).cpu()
                for images in heldout.images.split(cfg.eval.batch_size)
            ]
        )
        return _scores(accuracy_report(logits, heldout.labels).as_dict())

    return score


def _labelled(cfg: TrainConfig, tokenizer, device: torch.device) -> Evaluate:
    if not cfg.eval.classes:
        raise ValueError(f"eval.classes is required with eval.data = {cfg.eval.data!r} (a class file or set)")
    prompts = load_prompts(cfg.eval.classes)
    templates = (
        load_templates(cfg.eval.templates) if cfg.eval.templates else list(prompts.templates or ("{}",))
    )
    spec = DataSpec(cfg.eval.data, label_key=cfg.eval.label_key, max_samples=cfg.eval.max_samples)
    data = read_labelled(spec, prompts.classnames)  # image references only: nothing is decoded yet
    if data.skipped:
        log.info(
            "eval.data %s: %d images, %d samples left out %s",
            spec.path,
            len(data),
            data.skipped,
            data.skipped_by_reason,
        )

    def score(model: torch.nn.Module) -> dict[str, float]:
        evaluator = Evaluator(
            model,
            tokenizer,  # called with the model's context length, which is data.context_length
            batch_size=cfg.eval.batch_size,
            workers=cfg.data.workers,
            device=str(device),
            max_image_pixels=cfg.data.max_image_pixels,
        )
        return _scores(evaluator.zeroshot(data, prompts, templates).as_dict())

    return score


def _scores(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items() if k != "n"}
