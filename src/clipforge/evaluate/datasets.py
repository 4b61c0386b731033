"""Evaluation data: images with a class label or captions, from tar shards, image folders or CSV files.

Every reader returns an `EvalData`: the images as `ImageRef`s (a file, or a member of an uncompressed tar
read at its byte offset) and, in the same order, a class index or a list of captions per image. Nothing is
decoded while reading; `ImageDataset` (evaluate/images.py) decodes with OpenAI's exact eval transform in
DataLoader workers, and because every image has an index, the features come out in dataset order whatever
the worker count.

Formats (`DataSpec.format`, "auto" picks by the path):
- webdataset: uncompressed tars (``eval-{000..009}.tar``). Members sharing a key form a sample: the image
  (jpg, jpeg, png or webp), the label in the json field `label_key` (a class name or an index; "cls" reads
  the ``.cls`` member instead), captions in the `caption_key` member (``txt``: one caption per line) or in
  a json field (``json:field``, a string or a list of strings).
- folder: for labels, one sub-folder per class named after it (images anywhere below it); when no folder
  is named after a class of the class file and the counts agree, the folders in sorted order are the
  classes in order (ImageNet's ``n01440764/`` layout). For captions, every image with a same-name
  caption file (``cat.jpg`` + ``cat.txt``, one caption per line).
- csv: an image-path column (`image_key`, relative paths are relative to the CSV's folder) and a label
  column (`label_key`) or a caption column (`caption_key`); rows naming the same image add captions to it.

Samples that cannot be used are left out and counted by reason (`EvalData.skipped_by_reason`), never
guessed and never a crash: when read, a sample without an image, a label that is not one of the class
names, no caption; when decoded, an image that is missing, does not decode, or declares more pixels than
the limit (`transforms.loading.DEFAULT_MAX_IMAGE_PIXELS` unless set) -- see `drop_undecodable`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from clipforge.data.samples import MISSING_CAPTION, MISSING_IMAGE
from clipforge.evaluate.images import ImageDataset, ImageRef
from clipforge.transforms import EvalTransform

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


# ------------------------------------------------------------------------------------------------------
# Template files
# ------------------------------------------------------------------------------------------------------


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with `{}` where the class name goes."""
    templates = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{path}: every template needs '{{}}' for the class name (bad: {bad[:3]})")
    return templates


# ------------------------------------------------------------------------------------------------------
# Evaluation sets
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Where an evaluation set is and how to read its labels or captions (see the module docstring)."""

    path: str
    format: Literal["auto", "webdataset", "folder", "csv"] = "auto"
    label_key: str = "label"  # webdataset: json field, or "cls"; csv: column
    caption_key: str = "txt"  # webdataset: member extension or "json:<field>"; folder: suffix; csv: column
    image_key: str = "filepath"  # csv: the image-path column
    separator: str = ""  # csv: "" = "," for .csv, tab for .tsv
    max_samples: int = 0  # 0 = all

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if os.path.isdir(self.path):
            return "folder"
        if self.path.lower().endswith((".csv", ".tsv")):
            return "csv"
        return "webdataset"


UNKNOWN_LABEL = "unknown_label"  # a sample with no label, or one that is not among the classes


@dataclass
class EvalData:
    """Images in dataset order, each with a class index (`labels`) or its captions (`captions`)."""

    images: list[ImageRef]
    labels: list[int] | None = None
    captions: list[list[str]] | None = None
    classnames: list[str] | None = None
    # Samples left out, by reason: when read (missing_image, unknown_label, missing_caption) and when
    # decoded (corrupt_image, too_large; see `drop_undecodable`).
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    source: str = ""
    keys: list[str] = field(default_factory=list)  # each image's sample key or path, for messages

    def __len__(self) -> int:
        return len(self.images)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def discard(self, reasons: dict[int, str]) -> None:
        """Remove the images at the given indices (in place), counting each under its reason."""
        keep = [i for i in range(len(self.images)) if i not in reasons]
        self.images = [self.images[i] for i in keep]
        self.keys = [self.keys[i] for i in keep] if self.keys else []
        if self.labels is not None:
            self.labels = [self.labels[i] for i in keep]
        if self.captions is not None:
            self.captions = [self.captions[i] for i in keep]
        self.skipped_by_reason = dict(Counter(self.skipped_by_reason) + Counter(reasons.values()))


def drop_undecodable(
    data: EvalData, features: torch.Tensor, transform: EvalTransform, max_pixels: int | None = None
) -> torch.Tensor:
    """Remove from `data` (in place) the images whose `features` row is NaN -- the mark
    `features.image_features` leaves for an image that did not decode -- counted by reason, and return
    the other rows: features and `data` stay aligned. The reason is found by decoding those images
    again (few, and the cached features do not hold it); a NaN row whose image does decode is kept."""
    failed = torch.isnan(features).all(dim=1).nonzero().flatten().tolist()
    dataset = ImageDataset(data.images, transform, max_pixels)
    skips = {i: skip for i in failed if (skip := dataset.problem(i)) is not None}
    if not skips:
        return features
    counts = Counter(skip.reason for skip in skips.values())
    first, skip = next(iter(skips.items()))
    log.warning(
        "%s: %d image(s) left out (%s); the first, %s: %s",
        data.source,
        len(skips),
        ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())),
        data.keys[first] if data.keys else data.images[first],
        skip,
    )
    data.discard({i: skip.reason for i, skip in skips.items()})
    if not data.images:
        raise ValueError(f"{data.source}: no image could be used ({data.skipped_by_reason})")
    keep = torch.ones(len(features), dtype=torch.bool)
    keep[list(skips)] = False
    return features[keep]


def read_labelled(spec: DataSpec, classnames: Sequence[str] | None = None) -> EvalData:
    """Images with class indices. Without `classnames`, the classes are the labels found (sorted)."""
    records = list(_labelled_records(spec))
    found = [label for _, label, _ in records if label is not None]
    names = list(classnames) if classnames is not None else _classes_from_labels(found)
    index = _label_index(names, found, spec)
    skipped: Counter[str] = Counter()
    usable = []
    for ref, label, key in records:
        if ref is None:
            skipped[MISSING_IMAGE] += 1
        elif label not in index:
            skipped[UNKNOWN_LABEL] += 1
        else:
            usable.append((ref, index[label], key))
    kept = usable[: spec.max_samples or None]
    data = EvalData(
        images=[ref for ref, _, _ in kept],
        labels=[label for _, label, _ in kept],
        classnames=names,
        skipped_by_reason=dict(skipped),
        source=spec.path,
        keys=[key for _, _, key in kept],
    )
    return _non_empty(data, spec, "labelled")


def read_captioned(spec: DataSpec) -> EvalData:
    """Images with their captions (one or more each), in dataset order."""
    skipped: Counter[str] = Counter()
    usable = []
    for ref, captions, key in _captioned_records(spec):
        if ref is None:
            skipped[MISSING_IMAGE] += 1
        elif not captions:
            skipped[MISSING_CAPTION] += 1
        else:
            usable.append((ref, captions, key))
    kept = usable[: spec.max_samples or None]
    data = EvalData(
        images=[ref for ref, _, _ in kept],
        captions=[captions for _, captions, _ in kept],
        skipped_by_reason=dict(skipped),
        source=spec.path,
        keys=[key for _, _, key in kept],
    )
    return _non_empty(data, spec, "captioned")


def _non_empty(data: EvalData, spec: DataSpec, what: str) -> EvalData:
    if not data.images:
        raise ValueError(
            f"{spec.path}: no {what} images found ({data.skipped} samples skipped; check the format "
            f"{spec.resolved_format()!r}, label_key {spec.label_key!r}, caption_key {spec.caption_key!r})"
        )
    return data


def _classes_from_labels(labels: list[str | int]) -> list[str]:
    if all(isinstance(label, int) for label in labels):
        return [str(i) for i in range(max(labels, default=-1) + 1)]  # type: ignore[type-var]
    return sorted({str(label) for label in labels})


def _label_index(names: list[str], labels: list[str | int], spec: DataSpec) -> dict[str | int, int]:
    """Label value -> class index: a class name, or an integer index (or its decimal string).

    A name listed twice (ImageNet's "missile" and "sunglasses") maps to its first index: data labelled by
    such names is ambiguous, and should carry integer labels instead."""
    index: dict[str | int, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    if not any(label in index for label in labels) and spec.resolved_format() == "folder":
        # Folders named by id (ImageNet's n01440764, ...): sorted folder order is class order.
        folders = sorted({str(label) for label in labels})
        if len(folders) == len(names):
            return {folder: i for i, folder in enumerate(folders)}
    for i in range(len(names)):
        index.setdefault(i, i)
        index.setdefault(str(i), i)
    return index


# ---- per-format record readers: (image ref or None, label or captions, key) -------------------------


def _labelled_records(spec: DataSpec) -> Iterator[tuple[ImageRef | None, str | int | None, str]]:
    kind = spec.resolved_format()
    if kind == "webdataset":
        for key, image, members in _tar_samples(spec.path, {"json", "cls"}):
            yield image, _wds_label(members, spec.label_key, key), key
    elif kind == "folder":
        yield from _class_folder_records(spec.path)
    elif kind == "csv":
        for image, label, key in _csv_rows(spec, spec.label_key):
            yield image, (label if label else None), key
    else:
        raise ValueError(f"unknown data format {spec.format!r}")


def _captioned_records(spec: DataSpec) -> Iterator[tuple[ImageRef | None, list[str], str]]:
    kind = spec.resolved_format()
    if kind == "webdataset":
        wanted = {"json"} if spec.caption_key.startswith("json:") else {spec.caption_key}
        for key, image, members in _tar_samples(spec.path, wanted):
            yield image, _wds_captions(members, spec.caption_key), key
    elif kind == "folder":
        yield from _caption_file_records(spec.path, spec.caption_key)
    elif kind == "csv":
        grouped: dict[ImageRef, list[str]] = {}
        for image, caption, _ in _csv_rows(spec, spec.caption_key):
            if image is not None and caption:
                grouped.setdefault(image, []).append(caption)
        for image, captions in grouped.items():
            yield image, captions, image.path
    else:
        raise ValueError(f"unknown data format {spec.format!r}")


def _tar_samples(pattern: str, wanted: set[str]) -> Iterator[tuple[str, ImageRef | None, dict[str, bytes]]]:
    """(key, first image, the `wanted` small members' bytes) per sample, in shard and file order.

    Like webdataset, consecutive members sharing a key (the name up to the basename's first dot) are one
    sample. Only the tar headers and the wanted members are read here; images are read later by offset.
    """
    from webdataset.tariterators import base_plus_ext

    from clipforge.data.webdataset import expand_shards

    for shard in expand_shards(pattern):
        with _open_uncompressed(shard) as tar:
            key, image, members = None, None, {}
            for info in tar:
                name_key, ext = base_plus_ext(info.name) if info.isreg() else (None, None)
                if name_key is None:
                    continue
                if name_key != key:
                    if key is not None:
                        yield key, image, members
                    key, image, members = name_key, None, {}
                ext = ext.lower()
                if ext in IMAGE_KEYS and image is None:
                    image = ImageRef(shard, info.offset_data, info.size)
                elif ext in wanted:
                    members[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
            if key is not None:
                yield key, image, members


def _open_uncompressed(shard: str) -> tarfile.TarFile:
    try:
        return tarfile.open(shard, "r:")  # "r:" refuses compressed tars: their members have no offset
    except tarfile.ReadError as e:
        raise ValueError(f"{shard}: not an uncompressed tar ({e}); images are read by byte offset") from e


def _wds_label(members: dict[str, bytes], label_key: str, key: str) -> str | int | None:
    if label_key == "cls":
        return int(members["cls"].decode().strip()) if "cls" in members else None
    if "json" not in members:
        return None
    value = json.loads(members["json"]).get(label_key)
    if value is not None and not isinstance(value, (str, int)):
        raise ValueError(f"sample {key}: json field {label_key!r} is {value!r}, not a class name or index")
    return value


def _wds_captions(members: dict[str, bytes], caption_key: str) -> list[str]:
    if caption_key.startswith("json:"):
        value = json.loads(members["json"]).get(caption_key[5:]) if "json" in members else None
        lines = [value] if isinstance(value, str) else list(value or [])
    else:
        lines = members.get(caption_key, b"").decode("utf-8").splitlines()
    return [line.strip() for line in lines if isinstance(line, str) and line.strip()]


def _class_folder_records(root: str) -> Iterator[tuple[ImageRef, str, str]]:
    from clipforge.data.folder import list_images

    for folder in sorted(entry.name for entry in os.scandir(root) if entry.is_dir()):
        for path in list_images(os.path.join(root, folder), IMAGE_KEYS):
            yield ImageRef(path), folder, os.path.relpath(path, root)


def _caption_file_records(root: str, suffix: str) -> Iterator[tuple[ImageRef, list[str], str]]:
    from clipforge.data.folder import list_images

    for path in list_images(root, IMAGE_KEYS):
        caption_file = Path(f"{os.path.splitext(path)[0]}.{suffix.lstrip('.')}")
        lines = caption_file.read_text(encoding="utf-8").splitlines() if caption_file.is_file() else []
        yield ImageRef(path), [line.strip() for line in lines if line.strip()], os.path.relpath(path, root)


def _csv_rows(spec: DataSpec, value_column: str) -> Iterator[tuple[ImageRef | None, str, str]]:
    separator = spec.separator or ("\t" if spec.path.lower().endswith(".tsv") else ",")
    root = os.path.dirname(os.path.abspath(spec.path))
    with open(spec.path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        missing = [c for c in (spec.image_key, value_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{spec.path}: no column(s) {missing}; the header is {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            image = (row[spec.image_key] or "").strip()
            ref = ImageRef(os.path.join(root, image)) if image else None
            yield ref, (row[value_column] or "").strip(), f"row {line}"
