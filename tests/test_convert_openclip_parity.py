"""Parity with open_clip itself. The tests run open_clip in the side environment `.venv-ref` (`make
setup-ref`), found through CLIPFORGE_REF_PYTHON, by subprocess (scripts/openclip_reference.py): clipforge
writes, open_clip loads and encodes; open_clip writes, clipforge loads and encodes. Without the variable they
skip; in CI they fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from clipforge.checkpoints import load_model, save
from clipforge.convert import convert, openclip
from clipforge.models import create_model
from clipforge.models.config import MODEL_CONFIGS
from conftest import randomized_model
from openclip_tiny import TINY_CFGS, assert_close, batches, features, tiny_config
from tolerances import rounding_budget, rounding_tolerance

REPO = Path(__file__).resolve().parent.parent
OPENCLIP_NAMES = [n for n in MODEL_CONFIGS if n.startswith(openclip.PREFIX)]


# ---- parity with open_clip ----------------------------------------------------------------------------


def _ref_python() -> str:
    path = os.environ.get("CLIPFORGE_REF_PYTHON", "")
    if path and Path(path).is_file():
        return path
    message = (
        "CLIPFORGE_REF_PYTHON is not set to a python with open_clip_torch (make setup-ref builds .venv-ref)"
    )
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message + " [required in CI]", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """One run of scripts/openclip_reference.py over every case. "ours": {case: clipforge's side (a model
    and its features, or the path open_clip writes to)}, "theirs": {case: open_clip's features or config}."""
    python = _ref_python()
    tmp = tmp_path_factory.mktemp("parity")
    images, tokens = batches(tiny_config("gelu"))  # both tiny configs take the same input shapes
    torch.save(images, tmp / "images.pt")
    torch.save(tokens, tmp / "tokens.pt")
    cases, ours = [], {}
    for seed, kind in enumerate(TINY_CFGS):
        model = randomized_model(tiny_config(kind), seed=seed, layernorms=True)
        save(model, tmp / f"{kind}-src")
        convert(tmp / f"{kind}-src", tmp / f"{kind}.pt", "openclip")
        convert(tmp / f"{kind}-src", tmp / f"{kind}-hub", "openclip", hub=True)
        want = features(model, images, tokens)
        for layout, path in (("checkpoint", tmp / f"{kind}.pt"), ("hub", tmp / f"{kind}-hub")):
            name = f"clipforge->{layout}-{kind}"
            cases.append({"load": layout, "path": str(path), "model_cfg": TINY_CFGS[kind], "name": name})
            ours[name] = (model, want)
        for make in ("checkpoint", "hub", "hub-bin"):
            name = f"{make}->clipforge-{kind}"
            path = tmp / name / "checkpoints" / "epoch_1.pt" if make == "checkpoint" else tmp / name
            cases.append(
                {"make": make, "model_cfg": TINY_CFGS[kind], "path": str(path), "seed": 7, "name": name}
            )
            ours[name] = (path, None)
    convert(tmp / "quickgelu-src", tmp / "openai.pt", "openai")
    cases.append({"load": "openai", "path": str(tmp / "openai.pt"), "name": "clipforge->openai"})
    ours["clipforge->openai"] = ours["clipforge->checkpoint-quickgelu"]
    cases += [{"config": name[len(openclip.PREFIX) :], "name": name} for name in OPENCLIP_NAMES]
    for i, case in enumerate(cases):
        case["out"] = str(tmp / f"case-{i}.out")
    job = {"images": str(tmp / "images.pt"), "tokens": str(tmp / "tokens.pt"), "cases": cases}
    (tmp / "job.json").write_text(json.dumps(job))
    script = REPO / "scripts" / "openclip_reference.py"
    done = subprocess.run(
        [python, str(script), str(tmp / "job.json")], capture_output=True, text=True, timeout=300, cwd=tmp
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = {}
    for case in cases:
        out = Path(case["out"])
        theirs[case["name"]] = (
            json.loads(out.read_text()) if "config" in case else torch.load(out, weights_only=True)
        )
    return {"ours": ours, "theirs": theirs, "images": images, "tokens": tokens}


@pytest.mark.parametrize("name", OPENCLIP_NAMES)
def test_registered_configs_are_openclips(parity, name):
    published = parity["theirs"][name]
    assert openclip.config_from_openclip(published) == MODEL_CONFIGS[name]


@pytest.mark.parametrize("kind", list(TINY_CFGS))
@pytest.mark.parametrize("layout", ["checkpoint", "hub"])
def test_open_clip_computes_what_clipforge_wrote(parity, kind, layout):
    model, want = parity["ours"][f"clipforge->{layout}-{kind}"]
    theirs = parity["theirs"][f"clipforge->{layout}-{kind}"]
    assert_close(theirs, want, model.config)
    assert torch.equal(theirs["logit_scale"], model.logit_scale.detach())


def test_openais_build_model_computes_what_clipforge_wrote(parity):
    model, want = parity["ours"]["clipforge->openai"]
    assert_close(parity["theirs"]["clipforge->openai"], want, model.config)


@pytest.mark.parametrize("kind", list(TINY_CFGS))
@pytest.mark.parametrize("make", ["checkpoint", "hub", "hub-bin"])
def test_clipforge_computes_what_open_clip_wrote(parity, kind, make):
    path, _ = parity["ours"][f"{make}->clipforge-{kind}"]
    config = tiny_config(kind)
    if make == "checkpoint" and kind == "gelu":  # params.txt names an architecture clipforge lacks
        model = load_model(config, pretrained=path)
    elif make == "checkpoint":  # QuickGELU and 64-wide heads: the shapes tell it all
        with pytest.warns(UserWarning, match="QuickGELU assumed"):
            model = load_model(path)
    else:
        model = load_model(path)
    assert model.config == config
    theirs = parity["theirs"][f"{make}->clipforge-{kind}"]
    ours = features(model, parity["images"], parity["tokens"])
    assert_close(ours, theirs, config)
    assert torch.equal(model.logit_scale.detach(), theirs["logit_scale"])


def test_the_parity_checks_would_catch_a_wrong_activation(parity):
    # The same weights with QuickGELU in place of GELU move the features far outside the tolerance.
    model, want = parity["ours"]["clipforge->checkpoint-gelu"]
    swapped = create_model(dataclasses.replace(model.config, activation="quick_gelu")).eval()
    swapped.load_state_dict(model.state_dict())
    got = features(swapped, parity["images"], parity["tokens"])
    for key in ("image", "text"):
        tol = rounding_tolerance(want[key], *rounding_budget(model.config, key))
        assert (got[key] - want[key]).abs().max().item() > 100 * tol
