"""`clipforge train` refuses a bad config before it writes anything: one line naming the field and its
value, exit status 2, no traceback, and no run directory. Every case goes through the CLI entry point."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from clipforge.cli import main
from clipforge.configs import ConfigError, load_toml, toml_value
from clipforge.train import validate as validate_module
from clipforge.train.config import OptimConfig, ScheduleConfig, TrainConfig
from clipforge.train.loop import train
from conftest import MICRO_RECIPE, tiny_config
from sample_files import colour_png, labelled_samples, write_shard


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Data that is fine except for its size (3 samples, against a batch of 4), and things that are not
    what a field expects: an empty directory, a plain file."""
    root = tmp_path_factory.mktemp("files")
    (root / "images").mkdir()
    for i in range(3):
        (root / "images" / f"{i}.png").write_bytes(colour_png("red", shade=i))
        (root / "images" / f"{i}.txt").write_text("a red square")
    rows = "".join(f"images/{i}.png,a red square\n" for i in range(3))
    (root / "three.csv").write_text("filepath,caption\n" + rows)
    write_shard(root / "three-000.tar", labelled_samples(["red", "green", "blue"]))
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a directory\n")
    (root / "other-classes.json").write_text(json.dumps(["cyan", "magenta"]))
    return root


def run_cli(tmp_path: Path, tokenizer_dir: Path, *args: str) -> list[str]:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(MICRO_RECIPE)
    base = [
        "train",
        str(recipe),
        "--model.tokenizer",
        str(tokenizer_dir),
        "--run.out_dir",
        str(tmp_path / "run"),
    ]
    return [*base, *args]


def case(field: str, *args: str) -> tuple[str, list[str]]:
    return field, list(args)


# {files} in an argument is the `files` fixture's directory.
CASES = {
    "unknown model name": case("model.name", "--model.name", "ViT-Nope-16-32"),
    "missing shards": case(
        "data.path", "--data.source", "webdataset", "--data.path", "{files}/x-{000..002}.tar"
    ),
    "missing CSV": case("data.path", "--data.source", "csv", "--data.path", "{files}/missing.csv"),
    "missing folder": case("data.path", "--data.source", "folder", "--data.path", "{files}/missing"),
    "CSV is a directory": case("data.path", "--data.source", "csv", "--data.path", "{files}/empty"),
    "shard is a directory": case("data.path", "--data.source", "webdataset", "--data.path", "{files}/empty"),
    "folder is a file": case("data.path", "--data.source", "folder", "--data.path", "{files}/file.txt"),
    "lr nan": case("optim.lr", "--optim.lr", "nan"),
    "lr negative": case("optim.lr", "--optim.lr", "-1e-3"),
    "lr inf": case("optim.lr", "--optim.lr", "inf"),
    "lr not a number": case("optim.lr", "--optim.lr", "fast"),
    "pretrained empty dir": case("model.pretrained", "--model.pretrained", "{files}/empty"),
    "pretrained missing": case("model.pretrained", "--model.pretrained", "{files}/missing"),
    "tokenizer empty dir": case("model.tokenizer", "--model.tokenizer", "{files}/empty"),
    "tokenizer is a file": case("model.tokenizer", "--model.tokenizer", "{files}/file.txt"),
    "resume an empty dir": case("--resume", "--resume", "{files}/empty"),
    "resume a file": case("--resume", "--resume", "{files}/file.txt"),
    "eval.classes a directory": case(
        "eval.classes",
        "--eval.every",
        "0",
        "--eval.data",
        "{files}/three-000.tar",
        "--eval.classes",
        "{files}/empty",
    ),
    "eval.data missing": case(
        "eval.data",
        "--eval.every",
        "0",
        "--eval.data",
        "{files}/no-{000..001}.tar",
        "--eval.classes",
        "x.json",
    ),
    "eval.data without those classes": case(
        "eval.data",
        "--eval.every",
        "0",
        "--eval.data",
        "{files}/three-000.tar",
        "--eval.classes",
        "{files}/other-classes.json",
    ),
    "eval.templates missing": case(
        "eval.templates", "--eval.every", "0", "--eval.templates", "{files}/none.txt"
    ),
    "out_dir is a file": case("run.out_dir", "--run.out_dir", "{files}/file.txt"),
    "out_dir under a file": case("run.out_dir", "--run.out_dir", "{files}/file.txt/run"),
    "batch larger than the CSV": case(
        "data.batch_size", "--data.source", "csv", "--data.path", "{files}/three.csv"
    ),
    "batch larger than the folder": case(
        "data.batch_size", "--data.source", "folder", "--data.path", "{files}/images"
    ),
    "batch larger than the shards": case(
        "data.batch_size", "--data.source", "webdataset", "--data.path", "{files}/three-000.tar"
    ),
    "batch larger than synthetic": case("data.synthetic_samples", "--data.batch_size", "32"),
    "CSV column missing": case(
        "data.csv_caption_column",
        "--data.source",
        "csv",
        "--data.path",
        "{files}/three.csv",
        "--data.csv_caption_column",
        "text",
    ),
    "more workers than shards": case(
        "data.path",
        "--data.source",
        "webdataset",
        "--data.path",
        "{files}/three-000.tar",
        "--data.workers",
        "2",
    ),
    "steps 0": case("schedule.steps", "--schedule.steps", "0"),
    "steps negative": case("schedule.steps", "--schedule.steps", "-5"),
    "warmup past the end": case("schedule.warmup_steps", "--schedule.warmup_steps", "3"),
    "final_lr above lr": case("schedule.final_lr", "--schedule.final_lr", "1.0"),
    "weight_decay negative": case("optim.weight_decay", "--optim.weight_decay", "-0.1"),
    "beta2 of 1": case("optim.beta2", "--optim.beta2", "1.0"),
    "eps 0": case("optim.eps", "--optim.eps", "0"),
    "grad_clip nan": case("optim.grad_clip", "--optim.grad_clip", "nan"),
    "init_temperature inf": case("loss.init_temperature", "--loss.init_temperature", "inf"),
    "batch 0": case("data.batch_size", "--data.batch_size", "0"),
    "log_every 0": case("run.log_every", "--run.log_every", "0"),
    "threads negative": case("run.threads", "--run.threads", "-1"),
    "keep_checkpoints negative": case("run.keep_checkpoints", "--run.keep_checkpoints", "-1"),
    "max_bad_steps 0": case("run.max_bad_steps", "--run.max_bad_steps", "0"),
    "seed negative": case("run.seed", "--run.seed", "-1"),
    "precision fp16": case("run.precision", "--run.precision", "fp16"),
    "device unknown": case("run.device", "--run.device", "tpu"),
    "eval.every below -1": case("eval.every", "--eval.every", "-2"),
    "patch dropout on a ResNet": case(
        "model.patch_dropout", "--model.name", "RN50", "--model.patch_dropout", "0.5"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_config_is_one_line_exit_2_and_nothing_written(name, files, tmp_path, tokenizer_dir, capsys):
    field, args = CASES[name]
    argv = run_cli(tmp_path, tokenizer_dir, *(a.replace("{files}", str(files)) for a in args))
    before = sorted(p.name for p in files.rglob("*"))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith(f"clipforge train: {field} = "), lines[0]
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in files.rglob("*")) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path, tokenizer_dir, capsys):
    assert main(run_cli(tmp_path, tokenizer_dir, "--run.device", "cuda")) == 2
    assert capsys.readouterr().out.startswith("clipforge train: run.device = 'cuda': CUDA is not available")
    assert not (tmp_path / "run").exists()


def test_an_out_dir_that_cannot_be_written_is_refused(tmp_path, tokenizer_dir, capsys, monkeypatch):
    # Permission bits do not bind root, so the check's own question is answered "no" instead.
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(validate_module.os, "access", lambda path, mode: Path(path).name != "locked")
    argv = run_cli(tmp_path, tokenizer_dir, "--run.out_dir", str(tmp_path / "locked" / "run"))
    assert main(argv) == 2
    assert capsys.readouterr().out == (
        f"clipforge train: run.out_dir = '{tmp_path}/locked/run': cannot be created: "
        f"{tmp_path}/locked is not writable\n"
    )
    assert not (tmp_path / "locked" / "run").exists()


def test_pretrained_weights_of_another_shape_are_refused_before_the_run(tmp_path, tokenizer_dir, capsys):
    from clipforge import create_model, save

    save(create_model("ViT-Micro-16-32"), tmp_path / "weights")  # OpenAI's vocabulary and context: not ours
    assert main(run_cli(tmp_path, tokenizer_dir, "--model.pretrained", str(tmp_path / "weights"))) == 2
    out = capsys.readouterr().out
    assert (
        out.startswith("clipforge train: model.pretrained = ") and "context 77" in out and "context 16" in out
    )
    assert not (tmp_path / "run").exists()


def fake_checkpoint(path: Path, arch: str, **sections: dict) -> Path:
    """A checkpoint directory as `save_checkpoint` lays it out: the model saved, a trainer state whose config
    differs from the defaults by `sections`, and an optimizer file (unread by validation)."""
    from clipforge import create_model, save

    save(create_model(arch), path)
    config = dataclasses.asdict(TrainConfig())
    for section, fields in sections.items():
        config[section].update(fields)
    (path / "trainer_state.json").write_text(json.dumps({"step": 2, "config": config}))
    (path / "optimizer.safetensors").write_bytes(b"")
    return path


def test_resuming_a_checkpoint_of_another_model_is_refused(tmp_path, tokenizer_dir, capsys):
    checkpoint = fake_checkpoint(tmp_path / "old" / "step-00000002", "ViT-Nano-16-64")
    assert main(run_cli(tmp_path, tokenizer_dir, "--resume", str(checkpoint))) == 2
    assert capsys.readouterr().out == (
        f"clipforge train: model.name = 'ViT-Micro-16-32': the checkpoint --resume {checkpoint} was trained "
        "with model.name = 'ViT-Nano-16-64'\n"
    )
    assert not (tmp_path / "run").exists()


def test_resuming_a_checkpoint_with_another_vocabulary_is_refused(tmp_path, tokenizer_dir, capsys):
    # The names agree; the saved model has OpenAI's vocabulary and context, not the tokenizer's 600 and 16.
    checkpoint = fake_checkpoint(
        tmp_path / "old" / "step-00000002",
        "ViT-Micro-16-32",
        model={"name": "ViT-Micro-16-32"},
        data={"context_length": 16},
    )
    assert main(run_cli(tmp_path, tokenizer_dir, "--resume", str(checkpoint))) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"clipforge train: --resume = '{checkpoint}': holds ") and "context 77" in out
    assert not (tmp_path / "run").exists()


def test_train_itself_validates_before_creating_the_run_dir(tmp_path, tokenizer_dir):
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, "--model.pretrained", str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"^model\.pretrained = "):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["another architecture", "not CLIP weights"])
def test_a_weights_file_that_does_not_fit_is_one_line_before_the_run(kind, tmp_path, tokenizer_dir, capsys):
    # A single weights file is judged by its shapes (a safetensors header), before anything is built.
    from safetensors.torch import save_file

    from clipforge import create_model, save

    if kind == "another architecture":
        save(create_model("ViT-Micro-16-32"), tmp_path / "weights")  # OpenAI vocabulary, not the tokenizer
        weights_file, expected = tmp_path / "weights" / "model.safetensors", "context 77"
    else:
        weights_file, expected = tmp_path / "other.safetensors", "not CLIP weights"
        save_file({"encoder.weight": torch.zeros(3, 4)}, weights_file)
    assert main(run_cli(tmp_path, tokenizer_dir, "--model.pretrained", str(weights_file))) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"clipforge train: model.pretrained = '{weights_file}': ") and expected in out
    assert out.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: OptimConfig(lr=float("inf")), r"^optim\.lr = inf: must be a finite number > 0$"),
        (lambda: ScheduleConfig(steps=0), r"^schedule\.steps = 0: must be at least 1$"),
        (lambda: TrainConfig(optim=OptimConfig(lr=1e-4), schedule=ScheduleConfig(final_lr=1e-3)), "final_lr"),
    ],
)
def test_sections_refuse_bad_values_wherever_they_are_made(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_help_lists_every_config_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    defaults = TrainConfig()
    for section in dataclasses.fields(defaults):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            value = getattr(getattr(defaults, section.name), f.name)
            name = f"{section.name}.{f.name}"
            line = next((line for line in lines if line.split()[:1] == [name]), None)
            assert line is not None, name
            shown = "(unset" if value is None else toml_value(value)
            assert shown in line, (name, line)


def test_print_config_shows_the_resolved_config_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    assert main(run_cli(tmp_path, tokenizer_dir, "--optim.lr", "3e-4", "--print-config")) == 0
    (tmp_path / "printed.toml").write_text(capsys.readouterr().out)
    printed = load_toml(TrainConfig, tmp_path / "printed.toml")
    assert printed.optim.lr == 3e-4 and printed.model.name == "ViT-Micro-16-32"
    assert printed.model.tokenizer == str(tokenizer_dir) and printed.run.out_dir == str(tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("make", "problem"), [(lambda p: None, "not found"), (lambda p: p.mkdir(), "is not a file")]
)
def test_a_recipe_that_is_not_a_file_is_one_line(tmp_path, capsys, make, problem):
    make(tmp_path / "recipe.toml")
    assert main(["train", str(tmp_path / "recipe.toml")]) == 2
    assert capsys.readouterr().out == f"clipforge train: config file {problem}: {tmp_path / 'recipe.toml'}\n"
