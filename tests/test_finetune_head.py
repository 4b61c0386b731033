"""The zero-shot head: before any step, "image tower + head" classifies exactly as `clipforge eval
zeroshot` does; only the image tower (and, when asked, the head) can train; a saved head reads back."""

from __future__ import annotations

import json

import torch

import clipforge
from clipforge.cli import main
from clipforge.evaluate.datasets import DataSpec, read_labelled
from clipforge.evaluate.images import ImageDataset
from clipforge.evaluate.prompts import load_prompts
from clipforge.evaluate.tasks import Evaluator
from clipforge.evaluate.zeroshot import build_classifier_for_names, zeroshot_logits
from clipforge.finetune.head import ImageClassifier, head_accuracy, load_head, save_head, zeroshot_head
from clipforge.transforms import EvalTransform

TEMPLATES = ("a {} square", "a photo of {}")


def eval_path_logits(eval_files) -> tuple[torch.Tensor, list[int]]:
    """The logits `clipforge eval zeroshot` computes: the inference copy, its features and classifier."""
    evaluator = Evaluator.load(str(eval_files["model"]), workers=0, batch_size=8)
    prompts = load_prompts(eval_files["classes"])
    data = read_labelled(DataSpec(str(eval_files["eval"])), prompts.classnames)
    classifier = build_classifier_for_names(evaluator.model, evaluator.tokenize, prompts.classes, TEMPLATES)
    return zeroshot_logits(evaluator.image_features(data), classifier), data.labels


def head_path(eval_files) -> tuple[ImageClassifier, torch.Tensor]:
    model, _, tokenizer = clipforge.load(eval_files["model"])
    head = zeroshot_head(model, tokenizer, load_prompts(eval_files["classes"]), TEMPLATES)
    data = read_labelled(DataSpec(str(eval_files["eval"])), load_prompts(eval_files["classes"]).classnames)
    dataset = ImageDataset(data.images, EvalTransform(model.config.vision.image_size))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return ImageClassifier(model, head).eval(), images


def test_before_any_step_the_head_gives_eval_zeroshots_logits(eval_files, tmp_path, capsys):
    expected, labels = eval_path_logits(eval_files)
    classifier, images = head_path(eval_files)
    with torch.no_grad():
        logits = classifier(images)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-4)  # logits are 100 x cosine
    # ... and the accuracy `clipforge eval zeroshot` prints and writes.
    out = tmp_path / "z.json"
    args = ["--model", str(eval_files["model"]), "--data", str(eval_files["eval"])]
    args += ["--classes", str(eval_files["classes"]), "--templates", str(tmp_path / "t.txt")]
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES))
    assert main(["eval", "zeroshot", *args, "--workers", "0", "--json", str(out), "--no-progress"]) == 0
    top1 = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    assert json.loads(out.read_text())["metrics"]["top1"] == top1


def test_head_columns_are_the_normalized_template_ensemble(eval_files):
    model, _, tokenizer = clipforge.load(eval_files["model"])
    head = zeroshot_head(model, tokenizer, load_prompts(eval_files["classes"]), TEMPLATES)
    assert head.num_classes == 3
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(3))


def test_only_the_image_tower_and_a_trainable_head_take_gradients(eval_files):
    model, _, tokenizer = clipforge.load(eval_files["model"])
    head = zeroshot_head(model, tokenizer, load_prompts(eval_files["classes"]))
    visual = {id(p) for p in model.visual.parameters()}
    frozen = ImageClassifier(model, head)
    assert {id(p) for p in frozen.parameters() if p.requires_grad} == visual
    trainable = ImageClassifier(model, head, train_head=True)
    assert {id(p) for p in trainable.parameters() if p.requires_grad} == visual | {id(head.weight)}
    trainable.train()
    assert model.visual.training and not model.transformer.training


def test_a_saved_head_reads_back_and_scores_like_the_evaluator(eval_files, tmp_path):
    evaluator = Evaluator.load(str(eval_files["model"]), workers=0, batch_size=8)
    prompts = load_prompts(eval_files["classes"])
    head = zeroshot_head(evaluator.model, evaluator.tokenizer, prompts, TEMPLATES)
    save_head(head, prompts.classnames, tmp_path)
    loaded, names = load_head(tmp_path)
    assert names == prompts.classnames and torch.equal(loaded.weight, head.weight)
    data = read_labelled(DataSpec(str(eval_files["eval"])), names)
    expected = evaluator.zeroshot(data, prompts, TEMPLATES)
    data = read_labelled(DataSpec(str(eval_files["eval"])), names)
    assert head_accuracy(evaluator, loaded, data).top1 == expected.top1
