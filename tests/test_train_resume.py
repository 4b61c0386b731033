"""Resume is exact: a run stopped after its checkpoint and resumed ends bit-identical to a run never stopped,
with every option that draws random numbers, and its metrics.jsonl holds each step once.

Each run: ViT-Micro on 32x32 images, 8 steps, a checkpoint at step 4, stopped after logging step 6 (so
the stopped run logged two steps the resumed one does again).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipforge.data import build_train_loader
from clipforge.data.pipeline import TrainData
from clipforge.train.checkpointing import list_checkpoints
from clipforge.train.loop import Trainer, train
from clipforge.train.metrics import MetricsLog, truncate_metrics
from conftest import stub_tokenizer, tiny_config
from sample_files import write_shard

STOP_AFTER = 6  # the checkpoint is at step 4 (tiny_config: checkpoint_every 4, 8 steps)

CAPTIONS = ["a red circle", "two blue squares", "one green triangle at the top", "a large yellow star"]


def picture(i: int) -> bytes:
    """A textured 44x38 PNG, distinct for each ``i``, so every crop of it has different pixels."""
    image = Image.new("RGB", (44, 38))
    image.putdata(
        [((7 * x + 5 * i) % 256, (11 * y + i) % 256, (x * y) % 256) for y in range(38) for x in range(44)]
    )
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def caption(i: int) -> str:
    """Three captions, one per line: with data.captions='sample' each epoch may pick another one."""
    return "\n".join(CAPTIONS[(i + k) % len(CAPTIONS)] for k in range(3))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """16 images with their caption files: 2 batches of 8 an epoch, so 8 steps see 4 epochs."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(16):
        (root / f"{i:02d}.png").write_bytes(picture(i))
        (root / f"{i:02d}.txt").write_text(caption(i))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Two webdataset shards of 8 samples each."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(2):
        samples = [
            {"__key__": f"s{8 * s + k:03d}", "png": picture(8 * s + k), "txt": caption(8 * s + k)}
            for k in range(8)
        ]
        write_shard(root / f"part-{s}.tar", samples)
    return str(root / "part-{0..1}.tar")


# Every option that draws random numbers (the sigmoid loss draws none, but has its own parameter).
RANDOM_AUGMENT = ("--data.augment", "true", "--data.crop_scale", "[0.3, 1.0]", "--data.captions", "sample")
CASES = {
    "patch_dropout": ("synthetic", "--model.patch_dropout", "0.5"),
    "sigmoid_loss": ("synthetic", "--loss.name", "sigmoid"),
    "folder_augment_captions": ("folder", *RANDOM_AUGMENT),
    "folder_workers_patch_dropout": (
        "folder",
        *RANDOM_AUGMENT,
        "--data.workers",
        "2",
        "--model.patch_dropout",
        "0.5",
    ),
    "webdataset_shuffle_augment": ("webdataset", *RANDOM_AUGMENT, "--data.shuffle_buffer", "6"),
}


def data_args(kind: str, folder: Path, shards: str) -> list[str]:
    if kind == "synthetic":
        return []
    path = str(folder) if kind == "folder" else shards
    return ["--data.source", kind, "--data.path", path, "--data.batch_size", "8"]


def case_args(name: str, folder: Path, shards: str) -> list[str]:
    kind, *options = CASES[name]
    return [*data_args(kind, folder, shards), *options]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir)[-1] / "model.safetensors")


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_resumed_exactly(straight: Path, resumed: Path) -> None:
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    steps = logged_steps(resumed)
    assert steps == logged_steps(straight) == list(range(1, 9))


class Stopped(Exception):
    pass


def stop_then_resume(run_dir: Path, tokenizer_dir: Path, args: list[str], monkeypatch) -> None:
    """Train until step STOP_AFTER is logged (in process: an exception), then resume from step 4."""
    real_write = MetricsLog.write

    def write_then_stop(self, step, **values):
        real_write(self, step, **values)
        if step == STOP_AFTER:
            raise Stopped

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "write", write_then_stop)
        with pytest.raises(Stopped):
            train(tiny_config(run_dir, tokenizer_dir, *args))
    assert logged_steps(run_dir) == list(range(1, STOP_AFTER + 1))
    train(tiny_config(run_dir, tokenizer_dir, *args), resume="latest")


@pytest.mark.parametrize("name", list(CASES))
def test_stopped_and_resumed_run_ends_bit_identical(
    name, tmp_path, tokenizer_dir, folder, shards, monkeypatch
):
    args = case_args(name, folder, shards)
    train(tiny_config(tmp_path / "straight", tokenizer_dir, *args))
    stop_then_resume(tmp_path / "resumed", tokenizer_dir, args, monkeypatch)
    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed")


def test_resume_is_exact_even_when_starting_the_data_draws_from_the_global_rng(
    tmp_path, tokenizer_dir, monkeypatch
):
    """The saved states are restored after the data stream starts, where the saving run had them: a
    loader that drew from torch's global generator (as DataLoader does by default) changes nothing."""
    real_batches = TrainData.batches

    def batches_that_draw(self, start_batch=0):
        stream = real_batches(self, start_batch)
        torch.rand(2)
        return stream

    monkeypatch.setattr(TrainData, "batches", batches_that_draw)
    args = ["--model.patch_dropout", "0.5"]
    train(tiny_config(tmp_path / "straight", tokenizer_dir, *args))
    stop_then_resume(tmp_path / "resumed", tokenizer_dir, args, monkeypatch)
    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed")


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from clipforge.train import loop
from clipforge.train.metrics import MetricsLog
real_write = MetricsLog.write
def write_then_die(self, step, **values):
    real_write(self, step, **values)
    if step == {stop}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flushing: as hard as a crash gets
MetricsLog.write = write_then_die
loop.train(tiny_config(Path({out!r}), Path({tok!r}), *{args!r}))
"""


def test_sigkilled_and_resumed_run_ends_bit_identical(tmp_path, tokenizer_dir, folder, shards):
    """A real crash: SIGKILL with two loader workers alive; patch dropout, random crops, sampled captions."""
    args = case_args("folder_workers_patch_dropout", folder, shards)
    train(tiny_config(tmp_path / "straight", tokenizer_dir, *args))
    code = KILLED_RUN.format(
        tests=str(Path(__file__).parent),
        out=str(tmp_path / "killed"),
        tok=str(tokenizer_dir),
        args=args,
        stop=STOP_AFTER,
    )
    # Output to a file, not a pipe: orphaned loader workers would hold a pipe open until they notice.
    with open(tmp_path / "killed.log", "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], env=os.environ.copy(), stdout=out, stderr=out
        )
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-00000004"]
    train(tiny_config(tmp_path / "killed", tokenizer_dir, *args), resume="latest")
    assert_resumed_exactly(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.parametrize("workers", [0, 2])
def test_the_batch_stream_leaves_the_global_random_states_alone(workers, folder):
    cfg = tiny_config(
        Path("unused"), Path("unused"), *data_args("folder", folder, ""), "--data.workers", str(workers)
    )
    data = build_train_loader(cfg.data, stub_tokenizer, 32, seed=0)
    before = torch.get_rng_state()
    batches = data.batches(3)
    next(batches)
    assert torch.equal(torch.get_rng_state(), before)


def test_resume_without_a_checkpoint_starts_over_and_its_metrics_too(tmp_path, tokenizer_dir):
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, "--schedule.steps", "2")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    trainer = Trainer(cfg, resume="latest")
    assert trainer.state["step"] == 0
    trainer.run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and 9.0 not in losses


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "zeroshot_top1": 0.5},
        {"step": 2, "loss": 2.0},
        {"step": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # killed mid-line
    truncate_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind
    truncate_metrics(tmp_path / "absent.jsonl", 2)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
