"""Data-parallel plumbing: who this process is, joining the process group, and a gather that carries gradient.

A run is W processes, each with B pairs of the global batch of N = W * B. The losses in `loss.py` score this
process's rows against every column of the global batch; `gather_with_grad` is how the columns get here and
how their gradient gets back to the process whose tower produced them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: its global rank, the number of processes, its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The one process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """Read torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), else SLURM's (SLURM_PROCID, SLURM_NTASKS,
        SLURM_LOCALID), else a single process."""
        env = os.environ if env is None else env
        launchers = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        for names in launchers:
            if names[0] in env and names[1] in env:
                rank, size = _int(env, names[0]), _int(env, names[1])
                local = _int(env, names[2]) if names[2] in env else rank
                if not 0 <= rank < size or not 0 <= local < size:
                    place = f"{names[0]}={rank}, {names[1]}={size}, {names[2]}={local}"
                    raise ValueError(f"{place}: not a valid place in the run")
                return cls(rank, size, local)
        return cls()


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def init_process_group(world: World, device: torch.device) -> None:
    """Join the run's process group (nccl between GPUs, gloo on CPU); nothing to do for a single process.

    The rendezvous is torch's env:// one, so MASTER_ADDR and MASTER_PORT must be set (torchrun sets them;
    under SLURM set them in the batch script, e.g. to the first node's name and a free port).
    """
    if world.world_size == 1 or dist.is_initialized():
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"{world.world_size} processes but {name} is not set: the rendezvous needs it")
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sends each process the gradient of its own rows, summed over all.

    Why a sum and no 1/W: process r's loss L_r is normalized so that the global loss is L = (1/W) sum_r L_r
    (see `loss.py`), and DDP averages parameter gradients, so process r ends up contributing
    (1/W) * dL_r'/d theta for the L_r' it back-propagates. For theta's gradient to be dL/d theta =
    (1/W) sum_s sum_r dL_s/dx_r * dx_r/d theta, process r must back-propagate into its features x_r the
    total sum_s dL_s/dx_r: every process's loss depends on x_r through the gathered copy, and each holds
    its own dL_s/d(gathered)[rows of r]. all_reduce(SUM) then this process's slice is exactly that sum.
    The direct use of x_r on its own process (its rows of the logits) adds its own term through autograd.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming gradient is not ours
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` concatenated along dim 0 in rank order, differentiable (`x` with one process).

    All processes must pass the same shape (an equal local batch: drop the last partial batch).
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
