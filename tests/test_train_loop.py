"""End-to-end training on the synthetic set with a tiny model and a tiny trained tokenizer (no vocab file):
the `tokenizer_dir` fixture and `tiny_config` are in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipforge.train import loop as loop_module
from clipforge.train import loss as loss_module
from clipforge.train import steps as steps_module
from clipforge.train.checkpointing import list_checkpoints
from clipforge.train.loop import TrainingStopped, train
from conftest import tiny_config


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir)[-1] / "model.safetensors")


def test_short_run_lowers_the_loss_and_leaves_a_complete_run_dir(tmp_path, tokenizer_dir):
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, "--schedule.steps", "40", "--eval.every", "0")
    result = train(cfg)
    losses = [
        r["loss"]
        for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert set(result.zeroshot) >= {"top1", "top5"}
    for name in ("config.toml", "curves.png", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        f"step-{s:08d}" for s in range(24, 41, 4)
    ]  # keep 5


def test_compile_option_compiles_both_towers_in_place(tmp_path, tokenizer_dir, monkeypatch):
    compiled = []

    def record(self, *args, **kwargs):
        compiled.append(type(self).__name__)

    monkeypatch.setattr(torch.nn.Module, "compile", record)
    model = loop_module.build_model(tiny_config(tmp_path, tokenizer_dir, "--model.compile", "true"), 600)
    assert compiled == ["VisionTransformer", "Transformer"]
    assert "visual.conv1.weight" in model.state_dict()  # names unchanged: checkpoints stay loadable


def test_checkpoint_loads_with_clipforge_load(tmp_path, tokenizer_dir):
    from clipforge.checkpoints import load

    train(tiny_config(tmp_path / "run", tokenizer_dir, "--schedule.steps", "4"))
    model, _, tokenizer = load(list_checkpoints(tmp_path / "run")[-1])
    assert tokenizer.vocab_size == 600 and model.config.text.context_length == 16
    assert model.encode_text(tokenizer(["two red circles"], context_length=16)).shape == (1, 64)


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from clipforge.train import loop
real_save = loop.save_checkpoint
def save_then_die(run_dir, step, *args, **kwargs):
    real_save(run_dir, step, *args, **kwargs)
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flushing: as hard as a crash gets
loop.save_checkpoint = save_then_die
loop.train(tiny_config(Path({out!r}), Path({tok!r})))
"""


def test_sigkill_then_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, tokenizer_dir):
    train(tiny_config(tmp_path / "straight", tokenizer_dir))
    code = KILLED_RUN.format(
        tests=str(Path(__file__).parent), out=str(tmp_path / "killed"), tok=str(tokenizer_dir)
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=os.environ.copy(), capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-00000004"]
    train(tiny_config(tmp_path / "killed", tokenizer_dir), resume="latest")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def logged_steps(run_dir: Path) -> list[int]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if "loss" in r]


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, tokenizer_dir, monkeypatch, caplog):
    real_loss, calls = loss_module.contrastive_loss, {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 or calls["n"] >= 7 else loss

    monkeypatch.setattr(loss_module, "contrastive_loss", sometimes_nan)
    cfg = tiny_config(
        tmp_path / "run", tokenizer_dir, "--run.max_bad_steps", "3", "--run.checkpoint_every", "2"
    )
    # Calls 1, 2 make steps 1, 2; call 3 fails and call 4 makes step 3; calls 5, 6 make steps 4, 5; calls
    # 7-9 are three failed tries at step 6. Warnings number a failed try as the step it would have made.
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg)
    message = str(stopped.value)
    assert message.startswith(
        "stopped at step 6: 3 updates in a row skipped, the last for a non-finite loss;"
    )
    assert f"the last checkpoint this run wrote is {tmp_path / 'run' / 'step-00000004'}." in message
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(":")[0] for w in warnings] == ["step 3", "step 6", "step 6", "step 6"]
    assert all("non-finite loss (nan); update skipped" in w for w in warnings)
    assert logged_steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002", "step-00000004"]
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())


def test_a_non_finite_gradient_norm_is_named_as_such(tmp_path, tokenizer_dir, monkeypatch, caplog):
    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def inf_on_the_second_call(*args, **kwargs):
        calls["n"] += 1
        norm = real_clip(*args, **kwargs)
        return norm * float("inf") if calls["n"] == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_on_the_second_call)
    train(tiny_config(tmp_path / "run", tokenizer_dir, "--schedule.steps", "3"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("step 2: non-finite gradient norm (inf, loss ")
    assert logged_steps(tmp_path / "run") == [1, 2, 3]


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([0.0, -2.5], True),
        ([3e38, -3e38], True),  # finite, though its 2-norm overflows float32
        ([1.0, float("nan")], False),
        ([float("-inf"), 1.0], False),
        ([3e38, float("nan")], False),
    ],
)
def test_parameters_finite_is_exact(values, finite):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([values]))
    optimizer = torch.optim.AdamW(model.parameters())
    assert steps_module.parameters_finite(optimizer) is finite


@pytest.mark.parametrize(("poisoned_update", "kept"), [(1, []), (3, ["step-00000001", "step-00000002"])])
def test_an_update_that_makes_the_parameters_non_finite_stops_without_a_checkpoint(
    tmp_path, tokenizer_dir, monkeypatch, poisoned_update, kept
):
    """The optimizer itself goes wrong (as `optim.lr = inf` once did): a loss and gradient that are fine,
    then one weight that is not. Nothing non-finite may reach a checkpoint, not even the one due at once."""
    real_build, updates = loop_module.build_optimizer, {"n": 0}

    def build_poisoned(cfg, model):
        optimizer = real_build(cfg, model)
        real_step = optimizer.step

        def step(*args, **kwargs):
            result = real_step(*args, **kwargs)
            updates["n"] += 1
            if updates["n"] == poisoned_update:
                with torch.no_grad():
                    model.visual.conv1.weight[0, 0, 0, 0] = float("nan")
            return result

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(loop_module, "build_optimizer", build_poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(
            tiny_config(run_dir, tokenizer_dir, "--run.checkpoint_every", "1", "--run.keep_checkpoints", "0")
        )
    message = str(stopped.value)
    assert message.startswith(f"stopped at step {poisoned_update}: the update made the parameters non-finite")
    note = (
        f"the last checkpoint this run wrote is {run_dir / kept[-1]}"
        if kept
        else "no checkpoint was written by this run"
    )
    assert note in message
    assert [p.name for p in list_checkpoints(run_dir)] == kept
    assert logged_steps(run_dir) == list(range(1, poisoned_update))


def test_cli_trains_from_a_recipe_with_overrides(tmp_path, tokenizer_dir, capsys):
    from clipforge.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "ViT-Micro-16-32"\n[schedule]\nsteps = 2\nwarmup_steps = 1\n')
    out = str(tmp_path / "run")
    code = main(["train", str(recipe), "--model.tokenizer", str(tokenizer_dir), "--data.batch_size", "8",
                 "--data.context_length", "16", "--run.out_dir", out, "--run.progress", "false",
                 "--eval.every", "-1"])  # fmt: skip
    assert code == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert 'name = "ViT-Micro-16-32"' in (tmp_path / "run/config.toml").read_text()
    assert main(["train", str(recipe), "--optim.lrr", "1"]) == 2
    assert "unknown option --optim.lrr" in capsys.readouterr().out
