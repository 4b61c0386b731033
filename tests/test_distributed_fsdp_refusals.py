"""FSDP2 checkpoints refuse what they must: no process group, a missing index, another model, a non-empty
directory, and pickled code in the index or in a saved value (refused before it is run)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from clipforge.checkpoints.safe_unpickle import CheckpointError, UnsafeCheckpointError
from clipforge.distributed.fsdp import METADATA_FILE, load_sharded, save_sharded, shard_model
from fsdp_tiny import RESUME, Case, build, optimizer_for, train


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A sharded checkpoint saved by a single process without a process group."""
    directory = tmp_path_factory.mktemp("fsdp") / "w1"
    model = build(RESUME)
    optimizer = optimizer_for(model)
    train(model, optimizer, RESUME, range(1), rank=0, world=1, replicated=False)
    save_sharded(directory, model, optimizer)
    return directory


def test_shard_model_needs_a_process_group():
    with pytest.raises(ValueError, match="needs a process group"):
        shard_model(build(RESUME))


def test_loading_refuses_a_missing_index_and_a_different_model(saved, tmp_path):
    model = build(RESUME)
    with pytest.raises(CheckpointError, match=r"no \.metadata"):
        load_sharded(tmp_path, model, optimizer_for(model))
    other = build(Case("ViT-Micro-16-32", "sigmoid"))  # has a logit_bias the checkpoint lacks
    with pytest.raises(CheckpointError, match=f"{saved}.*logit_bias"):
        load_sharded(saved, other, optimizer_for(other))


def test_saving_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "something").write_text("x")
    model = build(RESUME)
    with pytest.raises(CheckpointError, match="not empty"):
        save_sharded(tmp_path, model, optimizer_for(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something"]


class Touch:
    """Unpickled without restrictions, this creates `marker`: the stand-in for running code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_an_index_that_references_code_is_refused_before_running_it(saved, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for f in (saved).iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran"
    (directory / METADATA_FILE).write_bytes(pickle.dumps(Touch(marker)))
    model = build(RESUME)
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        load_sharded(directory, model, optimizer_for(model))
    assert not marker.exists()


def test_a_value_that_references_code_is_refused_before_running_it(tmp_path):
    marker = tmp_path / "ran"
    model = build(RESUME)
    optimizer = optimizer_for(model)
    optimizer.param_groups[0]["note"] = Touch(marker)  # saved as a pickled value beside the tensors
    save_sharded(tmp_path / "ckpt", model, optimizer)
    assert not marker.exists()
    optimizer.param_groups[0]["note"] = None
    with pytest.raises(CheckpointError, match=r"param_groups\.0\.note"):
        load_sharded(tmp_path / "ckpt", model, optimizer)
    assert not marker.exists()
