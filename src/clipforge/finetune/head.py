"""A zero-shot-initialized linear head on CLIP's image features, and the model "image tower + head".

The robust fine-tuning baseline (Wortsman et al. 2022; Kumar et al. 2022) starts the classifier from the
zero-shot one: each class's weight is the re-normalized mean of its prompt templates' normalized text
embeddings (`evaluate.zeroshot.build_classifier_for_names`), and an image is scored by 100 x cosine
similarity (`zeroshot_logits`). Before any training step `ImageClassifier` therefore gives exactly the
logits of `clipforge eval zeroshot`.

A trained head is saved beside the model directory as `head.safetensors` (its (D, C) weight) and
`classes.json` (the class names, in column order); `load_head` reads it back and `head_accuracy` scores a
labelled set with it, the way `Evaluator.zeroshot` scores one with the text tower's classifier.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipforge.evaluate.datasets import EvalData
from clipforge.evaluate.prompts import Prompts
from clipforge.evaluate.tasks import Evaluator
from clipforge.evaluate.zeroshot import ZeroShotResult, accuracy_report, build_classifier_for_names
from clipforge.evaluate.zeroshot import zeroshot_logits as scaled_cosine

HEAD_FILE = "head.safetensors"
CLASSES_FILE = "classes.json"


class ZeroShotHead(nn.Module):
    """Logits = 100 x cos(image feature, class weight): `weight` is (D, C), one column per class.

    The weight is not re-normalized while it trains (a column's norm is then free to act as a per-class
    scale, as in an ordinary linear head); at initialization every column has norm 1."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return scaled_cosine(image_features, self.weight)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]


def zeroshot_head(
    model: nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    prompts: Prompts,
    templates: Sequence[str] = (),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> ZeroShotHead:
    """The head `clipforge eval zeroshot` would classify with: `prompts`' classes, `templates` (else the
    prompts' own, else "{}"), tokenized at the model's context length as `Evaluator.tokenize` does."""
    templates = tuple(templates) or prompts.templates or ("{}",)
    evaluator = Evaluator(model, tokenizer, batch_size=batch_size, device=str(device))
    weight = build_classifier_for_names(
        model, evaluator.tokenize, prompts.classes, templates, batch_size, device
    )
    return ZeroShotHead(weight).to(device)


class ImageClassifier(nn.Module):
    """CLIP's image tower followed by a `ZeroShotHead`. The CLIP model is held whole (so it can be saved as
    one), but only `model.visual` (and the head, when it trains) ever receive gradients."""

    def __init__(self, model: nn.Module, head: ZeroShotHead, train_head: bool = False):
        super().__init__()
        self.model = model
        self.head = head
        model.requires_grad_(False)
        model.visual.requires_grad_(True)
        head.requires_grad_(train_head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encode_image(images))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        # The text tower is never trained; keep everything but the image tower in eval mode.
        self.model.eval()
        self.model.visual.train(mode)
        return self


def save_head(head: ZeroShotHead, classnames: Sequence[str], directory: str | Path) -> None:
    """Write `head.safetensors` and `classes.json` into `directory` (which exists)."""
    directory = Path(directory)
    save_file({"weight": head.weight.detach().cpu().contiguous()}, directory / HEAD_FILE)
    (directory / CLASSES_FILE).write_text(json.dumps(list(classnames), indent=1) + "\n")


def load_head(directory: str | Path) -> tuple[ZeroShotHead, list[str]]:
    """The head and class names `save_head` wrote into `directory`."""
    directory = Path(directory)
    weight = load_file(directory / HEAD_FILE)["weight"]
    classnames = json.loads((directory / CLASSES_FILE).read_text())
    if len(classnames) != weight.shape[1]:
        raise ValueError(
            f"{directory}: {len(classnames)} class names for a head of {weight.shape[1]} classes"
        )
    return ZeroShotHead(weight), classnames


@torch.no_grad()
def head_accuracy(evaluator: Evaluator, head: ZeroShotHead, data: EvalData) -> ZeroShotResult:
    """Top-1/top-5 of `head` on `data` (labels in the head's class order), from the evaluator's image
    features: the same images, decoding and left-out images as `Evaluator.zeroshot`."""
    features = evaluator.image_features(data)  # leaves out the images that cannot be used, from data too
    logits = head.to(evaluator.device)(features.to(evaluator.device)).cpu()
    return accuracy_report(logits, torch.tensor(data.labels))
