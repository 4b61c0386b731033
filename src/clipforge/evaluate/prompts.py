"""Class names and prompt templates for zero-shot classification: from files, or built in.

Built in (`src/clipforge/evaluate/prompts/`, see its README for provenance): the class names and templates
OpenAI published for 26 datasets in CLIP's `data/prompts.md`, and ImageNet's 1,000 names and 80 templates
from their prompt-engineering notebook. A class may have several names (OpenAI's FER2013 does): the first
is its label, and the classifier averages over every name x template (see `build_classifier_for_names`).

    load_prompts("cifar10")              # built-in: names and templates
    load_prompts("classes.json")         # a JSON list of names, or {"classes": [...], "templates": [...]}
    load_templates("imagenet")           # the 80 templates alone
    load_templates("a photo of a {}.")   # a literal template
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from clipforge.evaluate.datasets import read_templates

# Template sets that belong to no dataset: the bare class name, and the paper's default prompt (§3.1.4).
BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "identity": ("{}",),
    "a-photo-of": ("a photo of a {}.",),
}


@dataclass(frozen=True)
class Prompts:
    """Each class's names (the first is its label) and the templates; templates may be empty."""

    classes: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]
    name: str = ""

    @property
    def classnames(self) -> list[str]:
        return [names[0] for names in self.classes]


def available_prompts() -> list[str]:
    """Names `load_prompts` knows without a file: the datasets of OpenAI's prompts.md, and imagenet."""
    folder = resources.files("clipforge.evaluate") / "prompts"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_prompts(name_or_path: str | Path) -> Prompts:
    """Class names (and templates, when the source has them) from a built-in name or a JSON file.

    A file holds a JSON list of class names, an object mapping ids to names (in key order), or an
    object {"classes": [...], "templates": [...]} where a class is a name or a list of names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return _parse(json.loads(path.read_text(encoding="utf-8")), str(path))
    name = str(name_or_path).lower()
    if name in available_prompts():
        builtin = resources.files("clipforge.evaluate") / "prompts" / f"{name}.json"
        return _parse(json.loads(builtin.read_text(encoding="utf-8")), name)
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a file nor a built-in prompt set ({', '.join(available_prompts())})"
    )


def load_templates(name_or_path: str | Path) -> list[str]:
    """Templates from a text file (one a line), a JSON file, a built-in name, or a literal with `{}`."""
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            templates = data.get("templates", []) if isinstance(data, dict) else data
            return _check_templates(templates, str(path))
        return read_templates(path)
    text = str(name_or_path)
    if text in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[text])
    if text.lower() in available_prompts():
        return list(load_prompts(text).templates)
    if "{}" in text:
        return [text]
    known = ", ".join([*BUILTIN_TEMPLATES, *available_prompts()])
    raise FileNotFoundError(f"{text!r}: no such template file, built-in set ({known}) or literal with '{{}}'")


def _parse(data: object, where: str) -> Prompts:
    if isinstance(data, dict) and "classes" in data:
        raw_classes, templates = data["classes"], data.get("templates", [])
        name = str(data.get("name", where))
    elif isinstance(data, dict):
        raw_classes, templates, name = list(data.values()), [], where
    else:
        raw_classes, templates, name = data, [], where
    if not isinstance(raw_classes, list) or not raw_classes:
        raise ValueError(f"{where}: expected a non-empty list of class names")
    classes = tuple(_class_names(c, where) for c in raw_classes)
    return Prompts(classes, tuple(_check_templates(templates, where)) if templates else (), name)


def _class_names(entry: object, where: str) -> tuple[str, ...]:
    names = [entry] if isinstance(entry, str) else entry
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: a class must be a name or a non-empty list of names, got {entry!r}")
    return tuple(names)


def _check_templates(templates: object, where: str) -> list[str]:
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"{where}: expected a non-empty list of template strings")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"{where}: every template needs '{{}}' for the class name (bad: {bad[:3]})")
    return list(templates)
