"""Zero-shot evaluation during training: the evaluation module's code, on a set fixed at start-up."""

from __future__ import annotations

from collections.abc import Callable

import torch

from clipforge.evaluate.datasets import iter_labelled_shards, read_classnames, read_templates
from clipforge.evaluate.zeroshot import accuracy_report, build_classifier, zeroshot_logits
from clipforge.train.config import TrainConfig

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


def make_evaluator(cfg: TrainConfig, tokenizer, image_size: int, device: torch.device) -> Evaluator | None:
    """A function model -> {"top1": ..., "top5": ...}, or None when evaluation is off."""
    if cfg.eval.every < 0:
        return None
    if cfg.eval.data == "synthetic":
        from clipforge.data.synthetic import TEMPLATES, synthetic_zeroshot_set

        heldout = synthetic_zeroshot_set(n_per_class=25, image_size=image_size, seed=10_000 + cfg.run.seed)
        batches = [(heldout.images, heldout.labels)]
        classnames, templates = list(heldout.classnames), list(TEMPLATES)
    else:
        classnames = read_classnames(cfg.eval.classes)
        batches = list(
            iter_labelled_shards(
                cfg.eval.data,
                classnames,
                image_size,
                cfg.eval.label_key,
                cfg.eval.batch_size,
                cfg.eval.max_samples,
            )
        )
        if not batches:
            raise ValueError(
                f"eval.data {cfg.eval.data}: no sample has a {cfg.eval.label_key!r} among the classes"
            )
        templates = ["{}"]
    if cfg.eval.templates:
        templates = read_templates(cfg.eval.templates)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, context_length=cfg.data.context_length, truncate=True)

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            classifier = build_classifier(model, tokenize, classnames, templates, cfg.eval.batch_size, device)
            logits = torch.cat(
                [zeroshot_logits(model.encode_image(x.to(device)), classifier).cpu() for x, _ in batches]
            )
            labels = torch.cat([y for _, y in batches])
            return {k: v for k, v in accuracy_report(logits, labels).as_dict().items() if k != "n"}
        finally:
            model.train(was_training)

    return evaluate
