"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory `step-00000200/` in the run directory:
- the model as a clipforge directory (`config.json` + `model.safetensors`), so `clipforge.load()` reads it;
- `optimizer.safetensors`: the AdamW moments and step counts, and the torch RNG states;
- `trainer_state.json`: the step, the data position, the other RNG states, the resolved config.
It is assembled in a hidden temporary directory and renamed into place, so a run killed at any moment
leaves either a whole checkpoint or none. No pickle anywhere: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clipforge.checkpoints.native import save_native

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
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


@dataclass
class RngState:
    """The global random states a training step may draw from: torch (CPU and each CUDA device), numpy,
    Python's `random`. Captured when a checkpoint is saved, restored where the run continues."""

    tensors: dict[str, torch.Tensor]  # torch's states as uint8 tensors (they go to safetensors)
    plain: dict[str, Any]  # numpy's and Python's, as JSON

    @classmethod
    def capture(cls) -> RngState:
        tensors = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        plain = {
            "python": [py_version, list(py_state), py_gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        }
        return cls(tensors, plain)

    def restore(self) -> None:
        torch.set_rng_state(self.tensors["rng.torch"])
        cuda_names = sorted((k for k in self.tensors if k.startswith("rng.cuda.")), key=_device_index)
        cuda = [self.tensors[k] for k in cuda_names]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, state, gauss = self.plain["python"]
        random.setstate((version, tuple(state), gauss))
        kind, keys, pos, has_gauss, gauss = self.plain["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _device_index(name: str) -> int:
    """`rng.cuda.10` after `rng.cuda.9`: devices in numeric order, not in the names' text order."""
    return int(name.rsplit(".", 1)[1])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer: Any | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    final = checkpoint_dir(run_dir, step)
    tmp = run_dir / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_native(model, tmp, tokenizer=tokenizer)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng = RngState.capture()
    save_file({**opt_tensors, **rng.tensors}, tmp / OPTIMIZER_FILE)
    state = {**trainer_state, "step": step, "optimizer": opt_meta, "rng": rng.plain}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    for path in (tmp / OPTIMIZER_FILE, tmp / STATE_FILE):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # an earlier attempt of this run that got this far; replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], RngState]:
    """Restore model and optimizer in place; return the trainer state (step, data position…) and the
    RNG states, which the caller restores where the saving run was when it saved them."""
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    tensors = load_file(path / OPTIMIZER_FILE)
    state = json.loads((path / STATE_FILE).read_text())
    _restore_optimizer(optimizer, tensors, state["optimizer"])
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, RngState(rng, state.pop("rng"))
