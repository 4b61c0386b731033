"""`clipforge finetune`: a few steps learn a tiny task, the text tower never moves, a frozen-head result is
a plain model whose `clipforge eval zeroshot` accuracy is the one reported, bad images are counted, runs
repeat exactly, and a bad config is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.configs import ConfigError, apply_overrides, load_toml
from clipforge.evaluate.datasets import DataSpec, read_labelled
from clipforge.evaluate.prompts import load_prompts
from clipforge.evaluate.tasks import Evaluator
from clipforge.finetune.classify import build_optimizer, finetune, prepare, train_classifier
from clipforge.finetune.config import FinetuneConfig
from clipforge.finetune.head import ImageClassifier, head_accuracy, load_head, zeroshot_head
from sample_files import labelled_samples, truncated_jpeg, write_shard

STEPS = 12


def recipe(path: Path, files: dict[str, Path], out: Path) -> Path:
    path.write_text(
        f"""
model = "{files["model"]}"
out_dir = "{out}"
batch_size = 6
steps = {STEPS}
lr = 2e-3
warmup_steps = 2
weight_decay = 0.0
log_every = 4

[data]
train = "{files["train"]}"
eval = "{files["eval"]}"
classes = "{files["classes"]}"
templates = "a {{}} square"
workers = 0
"""
    )
    return path


def config(files, tmp_path: Path, *overrides: str) -> FinetuneConfig:
    cfg = load_toml(FinetuneConfig, recipe(tmp_path / "ft.toml", files, tmp_path / "out"))
    return apply_overrides(cfg, list(overrides))


def train_top1(model_dir: Path, files) -> float:
    evaluator = Evaluator.load(str(model_dir), workers=0, batch_size=8)
    prompts = load_prompts(files["classes"])
    data = read_labelled(DataSpec(str(files["train"])), prompts.classnames)
    return evaluator.zeroshot(data, prompts, ["a {} square"]).top1


@pytest.fixture(scope="module")
def frozen_run(eval_files, tmp_path_factory):
    """One frozen-head run through the command line; its printed output, and the directory."""
    tmp = tmp_path_factory.mktemp("frozen")
    out = tmp / "out"
    assert main(["finetune", str(recipe(tmp / "ft.toml", eval_files, out))]) == 0
    return out


def test_fine_tuning_learns_the_training_set(eval_files, frozen_run):
    before, after = train_top1(eval_files["model"], eval_files), train_top1(frozen_run / "model", eval_files)
    assert after > before and after >= 0.9
    lines = [json.loads(line) for line in (frozen_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines[:-1]] == [4, 8, 12]
    assert lines[-1]["held_out"]["n"] == 9


def test_the_frozen_head_model_evaluates_as_reported(eval_files, frozen_run, tmp_path, capsys):
    reported = json.loads((frozen_run / "metrics.jsonl").read_text().splitlines()[-1])["held_out"]
    out = tmp_path / "z.json"
    args = ["--model", str(frozen_run / "model"), "--data", str(eval_files["eval"]), "--workers", "0"]
    args += ["--classes", str(eval_files["classes"]), "--templates", "a {} square", "--json", str(out)]
    assert main(["eval", "zeroshot", *args, "--no-progress"]) == 0
    assert json.loads(out.read_text())["metrics"]["top1"] == reported["top1"]
    assert not (frozen_run / "head.safetensors").exists()
    assert (frozen_run / "model" / "tokenizer").is_dir()
    assert "held_out" not in (frozen_run / "config.toml").read_text()  # the config, not the results


def test_the_text_tower_is_untouched_and_outside_the_optimizer(eval_files, tmp_path):
    cfg = config(eval_files, tmp_path, "--steps", "3", "--head", "trainable")
    prep = prepare(cfg)
    text_before = {k: v.clone() for k, v in prep.model.state_dict().items() if not k.startswith("visual.")}
    visual_before = prep.model.visual.conv1.weight.clone()
    head = zeroshot_head(prep.model, prep.tokenizer, prep.prompts, prep.templates)
    head_before = head.weight.detach().clone()
    classifier = ImageClassifier(prep.model, head, train_head=True)
    optimized = {id(p) for group in build_optimizer(classifier, cfg).param_groups for p in group["params"]}
    assert optimized == {id(p) for p in prep.model.visual.parameters()} | {id(head.weight)}
    train_classifier(classifier, prep.train, cfg, prep.device)
    for key, value in prep.model.state_dict().items():
        if not key.startswith("visual."):
            assert torch.equal(value, text_before[key]), key
    assert not torch.equal(prep.model.visual.conv1.weight, visual_before)
    assert not torch.equal(head.weight, head_before)


def test_a_trainable_head_is_saved_beside_the_model_and_scores_as_reported(eval_files, tmp_path):
    result = finetune(config(eval_files, tmp_path, "--head", "trainable", "--steps", "4"))
    head, names = load_head(result.out_dir)
    assert names == load_prompts(eval_files["classes"]).classnames
    evaluator = Evaluator.load(str(result.model_dir), workers=0, batch_size=8)
    data = read_labelled(DataSpec(str(eval_files["eval"])), names)
    assert head_accuracy(evaluator, head, data).top1 == result.held_out["top1"]


def test_runs_repeat_exactly_and_bad_images_are_counted(eval_files, tmp_path):
    samples = labelled_samples(["red", "green", "blue"] * 2)
    samples.append({"__key__": "broken", "jpg": truncated_jpeg(), "json": {"label": "red"}})
    shard = write_shard(tmp_path / "bad.tar", samples)
    results = []
    for run in ("a", "b"):
        overrides = [
            "--steps",
            "3",
            "--data.train",
            str(shard),
            "--data.eval",
            "",
            "--out_dir",
            str(tmp_path / run),
        ]
        results.append(finetune(config(eval_files, tmp_path, *overrides)))
    assert results[0].skipped_by_reason == {"corrupt_image": 1}
    a, b = (clipforge.load(r.model_dir)[0].state_dict() for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results[0].held_out is None


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--lr", "-1"], "lr = -1.0"),
        (["--head", "both"], "head = 'both'"),
        (["--data.classes", "no-such-classes.json"], "data.classes"),
        (["--data.train", "no-such.tar"], "data.train"),
        (["--model", "no-such-model-dir"], "model"),
        (["--warmup_steps", "99"], "warmup_steps"),
        (["--bogus", "1"], "unknown option --bogus"),
    ],
)
def test_a_bad_config_is_one_line_exit_2_and_writes_nothing(eval_files, tmp_path, capsys, flags, words):
    path = recipe(tmp_path / "ft.toml", eval_files, tmp_path / "out")
    assert main(["finetune", str(path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge finetune: ") and words in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_required_fields_may_come_from_the_command_line(eval_files, tmp_path):
    (tmp_path / "empty.toml").write_text("steps = 200\n")
    cfg = apply_overrides(load_toml(FinetuneConfig, tmp_path / "empty.toml"), ["--model", "m"])
    with pytest.raises(ConfigError, match="out_dir"):
        cfg.check_complete()


def test_worker_processes_change_nothing_and_the_result_merges(eval_files, frozen_run, tmp_path):
    overrides = ["--steps", "2", "--data.eval", "", "--data.workers", "2", "--out_dir", str(tmp_path / "w")]
    with_workers = finetune(config(eval_files, tmp_path, *overrides))
    overrides[5], overrides[7] = "0", str(tmp_path / "s")
    in_process = finetune(config(eval_files, tmp_path, *overrides))
    a, b = (clipforge.load(r.model_dir)[0].state_dict() for r in (with_workers, in_process))
    assert all(torch.equal(a[k], b[k]) for k in a)
    merged = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                str(eval_files["model"]),
                str(frozen_run / "model"),
                "--alpha",
                "0.5",
                "--out",
                str(merged),
            ]
        )
        == 0
    )
    assert clipforge.load(merged)[0] is not None


def test_an_earlier_output_is_replaced_and_any_other_directory_refused(eval_files, tmp_path, capsys):
    out = tmp_path / "out"
    finetune(
        config(
            eval_files,
            tmp_path,
            "--head",
            "trainable",
            "--steps",
            "1",
            "--warmup_steps",
            "0",
            "--data.eval",
            "",
        )
    )
    assert (out / "head.safetensors").is_file()
    finetune(config(eval_files, tmp_path, "--steps", "1", "--warmup_steps", "0", "--data.eval", ""))
    assert not (out / "head.safetensors").exists() and not (out / "classes.json").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    path = recipe(tmp_path / "ft.toml", eval_files, tmp_path / "other")
    assert main(["finetune", str(path)]) == 2
    assert "out_dir" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
