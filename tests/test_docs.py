"""The README and docs/ describe the product: no development history, links that resolve, figures that
agree with the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from clipforge.models import create_model

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Wording that narrates how the project was made, or names the machine it was made on, rather than
# describing the product: rounds of work, issue numbers, development paths, an unnamed "this CPU".
HISTORY = re.compile(
    r"\bsession \d|\bround \d|\bissue #?\d|\(#\d+\)|/work/|\bthis CPU\b|\bdevice tool\b|\blent\b", re.I
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_hold_no_development_history(doc: Path) -> None:
    hits = [
        f"{doc.name}:{n}: {line.strip()}"
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    targets = [t for t in LINK.findall(doc.read_text()) if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_readme_parameter_count_of_the_demo_model_is_the_models() -> None:
    text = (ROOT / "README.md").read_text()
    name, millions = re.search(r"`(ViT-Nano-8-64)` \((\d+\.\d) M parameters", text).groups()
    with torch.device("meta"):
        count = sum(p.numel() for p in create_model(name).parameters())
    assert f"{count / 1e6:.1f}" == millions
