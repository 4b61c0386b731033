"""How one training forward is spread over the run's processes: DDP (a whole model per process, gradients
averaged) or FSDP2 (parameters, gradients and optimizer state sharded), chosen once by `run.strategy`.

What the trainer gets back is the module to call and a context that turns the gradient all-reduce off for
the backward passes before a step's last one (the gradient cache backpropagates once per micro-batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.distributed.world import World

NoSync = Callable[[], contextlib.AbstractContextManager]


def data_parallel(
    module: nn.Module, world: World, strategy: str, device: torch.device
) -> tuple[nn.Module, NoSync]:
    """`module` ready for this run's processes, and its "no gradient sync" context."""
    if world.world_size == 1:
        return module, contextlib.nullcontext
    if strategy == "fsdp":
        from clipforge.distributed.fsdp import shard_model

        sharded = shard_model(module)
        return sharded, lambda: _fsdp_no_sync(sharded)
    if strategy != "ddp":
        raise ValueError(f"run.strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    # Buffers are not broadcast on every forward: the gradient cache calls forward a different number of
    # times on processes whose batches differ in size, and a collective per forward would then hang.
    ddp = DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )
    return ddp, ddp.no_sync


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
