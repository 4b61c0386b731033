"""Labelled evaluation images: webdataset shards whose json names each sample's class."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from clipforge.transforms import EvalTransform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def read_classnames(path: str | Path) -> list[str]:
    """A JSON list of class names (or a dict whose values are the names, in key order)."""
    data = json.loads(Path(path).read_text())
    names = list(data.values()) if isinstance(data, dict) else data
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of class-name strings")
    return names


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with `{}` where the class name goes."""
    templates = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{path}: every template needs '{{}}' for the class name (bad: {bad[:3]})")
    return templates


def iter_labelled_shards(
    spec: str,
    classnames: Sequence[str],
    image_size: int,
    label_key: str = "label",
    batch_size: int = 256,
    max_samples: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches from shards in file order; samples whose label is no class are skipped."""
    import webdataset as wds

    index = {name: i for i, name in enumerate(classnames)}
    transform = EvalTransform(image_size)
    images, labels, seen = [], [], 0
    for sample in wds.WebDataset(spec, shardshuffle=False, empty_check=False):
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None or "json" not in sample:
            continue
        label = json.loads(sample["json"]).get(label_key)
        if label not in index:
            continue
        images.append(transform(Image.open(io.BytesIO(sample[key]))))
        labels.append(index[label])
        seen += 1
        if len(images) == batch_size or seen == max_samples:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
        if seen == max_samples:
            return
    if images:
        yield torch.stack(images), torch.tensor(labels)
