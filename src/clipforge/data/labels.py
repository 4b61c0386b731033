"""Captions made from class labels: a prompt template filled with the sample's class name (FLYP).

FLYP (Goyal et al. 2023, "Finetune like you pretrain") fine-tunes CLIP on a labelled set with CLIP's own
contrastive loss, captioning each image with a template such as "a photo of a {}." filled with its class
name, and scores zero-shot with the same templates. With ``data.captions = "templates"`` a source hands
over each sample's label (`RawSample.label`) instead of a caption, and `ClassCaptions.caption` turns it
into text: the template is picked by the sample's per-epoch augmentation key, as ``captions = "sample"``
picks a line, so the choice is the same on any number of processes and workers and after a resume.

A label is a class name (the first name of a class), a class index, or an index's decimal text, as
`clipforge.evaluate.read_labelled` reads them. A label that is none of these is skipped and counted
(``unknown_label``), never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from clipforge.data.samples import UNKNOWN_LABEL, Skip, derive_seed
from clipforge.data.tarfiles import tar_files


@dataclass(frozen=True)
class ClassCaptions:
    """Class names, templates and the label -> class index map; picklable (it runs in the workers)."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    index: dict[str | int, int]

    def knows(self, label: str | int | None) -> bool:
        """Whether ``label`` names a class (a bool is no index, though Python counts it as an int)."""
        if isinstance(label, str):
            label = label.strip()
        return label is not None and not isinstance(label, bool) and label in self.index

    def class_of(self, label: str | int | None) -> int:
        """The class index of ``label``; `Skip` (unknown_label) when it names no class."""
        if not self.knows(label):
            raise Skip(UNKNOWN_LABEL, repr(label))
        return self.index[label.strip() if isinstance(label, str) else label]  # type: ignore[index]

    def caption(self, label: str | int | None, key: int) -> str:
        """The caption of a sample labelled ``label`` whose augmentation key is ``key``."""
        name = self.classnames[self.class_of(label)]
        return self.templates[derive_seed("template", key) % len(self.templates)].replace("{}", name)


def class_captions(classes: str, templates: str, folders: Iterable[str] = ()) -> ClassCaptions:
    """`ClassCaptions` from ``data.classes`` (a class file or a built-in set, as ``eval.classes``) and
    ``data.templates`` (a file, a built-in set or a literal with ``{}``; "" = the classes' own templates,
    else the bare name: what training-time evaluation uses for the same fields of ``eval``).

    ``folders``: the class folders of a folder source. When none is named after a class and there are as
    many as classes, they are the classes in sorted order (ImageNet's ``n01440764/`` layout), as
    `read_labelled` reads such a tree. Raises ValueError "data.classes: ..." or "data.templates: ...".
    """
    # Imported here: clipforge.evaluate imports clipforge.data, not the other way round at import time.
    from clipforge.evaluate.prompts import load_prompts, load_templates

    try:
        prompts = load_prompts(classes)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"data.classes: {e}") from None
    names = prompts.classnames
    try:
        chosen = load_templates(templates) if templates else list(prompts.templates or ("{}",))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"data.templates: {e}") from None
    return ClassCaptions(tuple(names), tuple(chosen), label_index(names, sorted(set(folders))))


def label_index(names: Sequence[str], folders: Sequence[str] = ()) -> dict[str | int, int]:
    """Label -> class index: each name (a name listed twice maps to its first class), then each index
    and its decimal text; or sorted ``folders`` -> classes in order (see `class_captions`)."""
    if folders and len(folders) == len(names) and not set(folders) & set(names):
        return {folder: i for i, folder in enumerate(folders)}
    index: dict[str | int, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    for i in range(len(names)):
        index.setdefault(i, i)
        index.setdefault(str(i), i)
    return index


def shard_label(sample: dict[str, bytes], label_key: str) -> str | int | None:
    """A webdataset sample's label: the ``.cls`` member's text when ``label_key`` is "cls", else the
    json member's field ``label_key``; None when missing or unreadable (the sample is then skipped)."""
    if label_key == "cls":
        data = sample.get("cls")
        return bytes(data).decode("utf-8", errors="replace").strip() if data is not None else None
    data = sample.get("json")
    if data is None:
        return None
    try:
        value = json.loads(data).get(label_key)
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        return None
    return value if isinstance(value, (str, int)) else None


def first_shard_labels(path: str, label_key: str, count: int = 8) -> list[str | int | None]:
    """The labels of the first ``count`` samples of the local shard ``path``: a cheap check, before a run,
    that ``data.label_key`` names what the shards hold."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, bytes]] = {}
    for name, data in tar_files(path):
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if key not in samples:
            if len(samples) == count:
                break
            samples[key] = {}
        samples[key][ext.lower()] = data
    return [shard_label(members, label_key) for members in samples.values()]
