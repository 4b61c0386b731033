"""Zero-shot classification (Radford et al. 2021, §3.1.4).

Each class becomes a text classifier weight: every prompt template is filled with the class name, the
texts are encoded and L2-normalized, averaged over templates (the "ensemble"), and re-normalized. An image
is scored against every class by 100 x the cosine similarity, as OpenAI's notebooks do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipforge.evaluate.features import encode_texts

# OpenAI's zero-shot notebooks scale cosine similarities by a fixed 100 rather than the learned scale.
ZEROSHOT_SCALE = 100.0


def fill_template(template: str, classname: str) -> str:
    """`template` with `{}` replaced by the class name (not str.format: class names may hold braces)."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
    return template.replace("{}", classname)


@torch.no_grad()
def build_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = ("{}",),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(D, C) zero-shot weights: per class, the re-normalized mean of the normalized template embeddings."""
    texts = [fill_template(t, c) for c in classnames for t in templates]
    features = encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device)
    per_template = features.view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(per_template.mean(dim=1), dim=-1).t().to(device)  # (D, C)


@torch.no_grad()
def build_classifier_for_names(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    names_per_class: Sequence[Sequence[str]],
    templates: Sequence[str] = ("{}",),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(D, C) weights for classes with several names (OpenAI's FER2013 has some): the re-normalized mean
    over every name x template of the class. With one name per class it is `build_classifier`."""
    if all(len(names) == 1 for names in names_per_class):
        classnames = [names[0] for names in names_per_class]
        return build_classifier(model, tokenizer, classnames, templates, batch_size, device)
    texts = [fill_template(t, name) for names in names_per_class for name in names for t in templates]
    owner = torch.tensor([c for c, names in enumerate(names_per_class) for _ in names for _ in templates])
    features = encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device)
    sums = torch.zeros(len(names_per_class), features.shape[1]).index_add_(0, owner, features)
    means = sums / torch.bincount(owner, minlength=len(names_per_class))[:, None]
    return F.normalize(means, dim=-1).t().to(device)  # (D, C)


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, C) logits: 100 x cosine similarity between each image and each class weight."""
    return ZEROSHOT_SCALE * F.normalize(image_features.float(), dim=-1) @ classifier


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    mean_per_class: (
        float  # accuracy averaged over classes present in the data (the paper's metric for some sets)
    )
    per_class: dict[int, float]  # top-1 accuracy of each class present
    n: int
    confusion: torch.Tensor | None = None  # (C, C) counts, rows = true class, when asked for

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "mean_per_class": self.mean_per_class, "n": self.n}


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, confusion: bool = False) -> ZeroShotResult:
    """Top-1, top-5, per-class and mean per-class accuracy of (N, C) logits against (N,) labels."""
    n, num_classes = logits.shape
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices  # (N, k)
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    present = labels.unique()
    per_class = {int(c): hit1[labels == c].float().mean().item() for c in present}
    matrix = None
    if confusion:
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
        matrix.index_put_((labels, topk[:, 0]), torch.ones(n, dtype=torch.long), accumulate=True)
    return ZeroShotResult(
        top1=hit1.float().mean().item(),
        top5=hit5.float().mean().item(),
        mean_per_class=sum(per_class.values()) / max(1, len(per_class)),
        per_class=per_class,
        n=n,
        confusion=matrix,
    )


@torch.no_grad()
def encode_images(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(N, D) image features of preprocessed image batches, in order."""
    return torch.cat([model.encode_image(images.to(device)).float().cpu() for images in batches])
