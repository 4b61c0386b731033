"""How one training forward is spread over the run's processes: DDP (a whole model per process, gradients
averaged) or FSDP2 (parameters, gradients and optimizer state sharded), chosen once by `run.strategy`.

What the trainer gets back is a `Parallel`: the module to call, a context that turns the gradient
all-reduce off for the backward passes before a step's last one (the gradient cache backpropagates once
per micro-batch), and how to get the whole model back where one process needs it (evaluation, the
checkpoint's model files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.distributed.world import World
from clipforge.models import CLIP

NoSync = Callable[[], contextlib.AbstractContextManager]
STRATEGIES = ("ddp", "fsdp")


@dataclass
class Parallel:
    forward: nn.Module  # what a step calls: a TrainingForward, maybe DDP-wrapped
    no_sync: NoSync = contextlib.nullcontext
    # FSDP2: each process holds a shard of the parameters and optimizer state, so checkpoints are sharded
    # (see `distributed/fsdp.py`) and the whole model exists only when gathered.
    sharded: bool = False

    def whole_model(self, model: CLIP) -> CLIP | None:
        """`model` unsharded, on its device, in rank 0 (None elsewhere when sharded). Collective when
        sharded: every process must call it. A replicated model is returned as it is, on every process."""
        if not self.sharded:
            return model
        from clipforge.distributed.fsdp import full_model

        whole = full_model(model)
        return None if whole is None else whole.to(next(model.parameters()).device)


def data_parallel(forward: nn.Module, world: World, strategy: str, device: torch.device) -> Parallel:
    """`forward` (a TrainingForward of the run's model) ready for this run's processes.

    With FSDP2 the model inside is sharded in place (its encoders are what gathers the weights), and the
    run keeps the sharded checkpoint format at any process count, one included, so it can resume on any."""
    if strategy not in STRATEGIES:
        raise ValueError(f"run.strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if strategy == "fsdp":
        if world.world_size == 1:  # nothing to shard over; the checkpoints are sharded all the same
            return Parallel(forward, sharded=True)
        from clipforge.distributed.fsdp import shard_model

        sharded = shard_model(forward.model)
        return Parallel(forward, lambda: _fsdp_no_sync(sharded), sharded=True)
    if world.world_size == 1:
        return Parallel(forward)
    # Buffers are not broadcast on every forward: the gradient cache calls forward a different number of
    # times on processes whose batches differ in size, and a collective per forward would then hang.
    ddp = DistributedDataParallel(
        forward, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )
    return Parallel(ddp, ddp.no_sync)


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
