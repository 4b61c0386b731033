"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory `step-00000200/` in the run directory:
- the model as a clipforge directory (`config.json` + `model.safetensors`), so `clipforge.load()` reads it;
- `optimizer.safetensors`: the AdamW moments and step counts;
- `trainer_state.json`: the step, the data position, the skip counts, the resolved config;
- with `optim.ema`, `ema/`: the weights' moving average, as a clipforge directory of its own.
It is assembled in a hidden temporary directory and renamed into place, so a run killed at any moment
leaves either a whole checkpoint or none. No pickle anywhere: nothing in a checkpoint can run code.

A sharded run (`run.strategy = "fsdp"`) writes the same directory with the optimizer state, and the model
again, as a `torch.distributed.checkpoint` directory `sharded/` instead of `optimizer.safetensors`: each
process writes its own shards, and any number of processes resumes from it (its pickled index is read
without running code, see `distributed/fsdp.py`). The model files beside it are the gathered whole model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipforge.atomic import fsync_path
from clipforge.checkpoints.native import save_native
from clipforge.train.ema import EMA_DIR

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SHARDED_DIR = "sharded"  # a sharded run's model and optimizer state
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """`--resume latest` (newest checkpoint of the run, or None for a fresh run) or an explicit path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_FILE} in it)")
    return path


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split the optimizer state into tensors (for safetensors) and plain JSON (hyperparameters)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer: Any | None = None,
    keep: int = 2,
    average: torch.nn.Module | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    tmp = _start(run_dir, step)
    save_native(model, tmp, tokenizer=tokenizer)
    if average is not None:
        save_native(average, tmp / EMA_DIR, tokenizer=tokenizer)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, tmp / OPTIMIZER_FILE)
    fsync_path(tmp / OPTIMIZER_FILE)
    return _finish(tmp, run_dir, step, {**trainer_state, "optimizer": opt_meta}, keep)


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    whole: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer: Any | None = None,
    keep: int = 2,
) -> Path:
    """`save_checkpoint` for a sharded run. Collective: every process calls it, with `whole` the gathered
    model on rank 0 (None elsewhere). Rank 0 writes the model files and the state and renames the
    directory into place once every process has written its shards."""
    from clipforge.distributed.fsdp import save_sharded
    from clipforge.distributed.world import barrier, process_rank

    main = process_rank() == 0
    tmp = _partial_dir(run_dir, step)
    if main:
        _start(run_dir, step)
        save_native(whole, tmp, tokenizer=tokenizer)
    barrier()
    save_sharded(tmp / SHARDED_DIR, model, optimizer)  # its index is written last, by rank 0
    barrier()
    return _finish(tmp, run_dir, step, trainer_state, keep) if main else checkpoint_dir(run_dir, step)


def _partial_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".{checkpoint_dir(run_dir, step).name}.partial"


def _start(run_dir: Path, step: int) -> Path:
    """The hidden directory a checkpoint is assembled in, cleared of an earlier attempt's leftovers."""
    tmp = _partial_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _finish(tmp: Path, run_dir: Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write the trainer state, rename the checkpoint into place, drop all but the newest `keep`."""
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1) + "\n")
    fsync_path(tmp / STATE_FILE)
    final = checkpoint_dir(run_dir, step)
    if final.exists():  # an earlier attempt of this run that got this far; replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; return the trainer state (step, data position…).

    A sharded checkpoint loads into a sharded model on any number of processes, or into a whole model in
    one process; it is collective then. A replicated one loads into a whole model only.
    No random state is kept: the data is keyed by sample, and a training step seeds torch's generators
    from (run seed, step, process), so a resumed run draws what the stopped one would have drawn."""
    state = json.loads((path / STATE_FILE).read_text())
    if (path / SHARDED_DIR).is_dir():
        from clipforge.distributed.fsdp import load_sharded

        load_sharded(path / SHARDED_DIR, model, optimizer)
        return state
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    _restore_optimizer(optimizer, load_file(path / OPTIMIZER_FILE), state["optimizer"])
    return state
