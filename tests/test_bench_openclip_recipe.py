"""A clipforge recipe spelled as OpenCLIP's trainer command line: every setting, or a refusal."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from bench.openclip_recipe import make_plan, openclip_argv

REFERENCE = str(Path(__file__).resolve().parents[1] / "configs/pictext-reference.toml")


def _args(tmp_path, **overrides) -> argparse.Namespace:
    args = dict(recipe=REFERENCE, steps=None, samples=None, epochs=1, batch_size=None, warmup=None)
    args |= dict(workers=None, seed=None, device="cpu", resampled=False, out=str(tmp_path))
    return argparse.Namespace(**(args | overrides))


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_reference_recipe_is_six_openclip_epochs_of_its_settings(tmp_path):
    argv = openclip_argv(make_plan(_args(tmp_path, epochs=6)))
    assert _flag(argv, "--epochs") == "6"
    assert _flag(argv, "--train-num-samples") == str(132 * 128)  # one epoch: 132 batches of 128
    assert (_flag(argv, "--lr"), _flag(argv, "--wd"), _flag(argv, "--warmup")) == ("0.001", "0.1", "200")
    assert (_flag(argv, "--workers"), _flag(argv, "--batch-size")) == ("1", "128")


def test_steps_that_do_not_split_into_the_epochs_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="792 steps do not split evenly into --epochs 5"):
        make_plan(_args(tmp_path, epochs=5))


def test_a_recipe_setting_openclip_is_not_given_is_refused(tmp_path):
    recipe = tmp_path / "sigmoid.toml"
    recipe.write_text(Path(REFERENCE).read_text() + '\n[loss]\nname = "sigmoid"\n')
    with pytest.raises(SystemExit, match=r"loss\.name"):
        make_plan(_args(tmp_path, recipe=str(recipe)))
