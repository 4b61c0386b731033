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

    Processes may hold different numbers of rows (a batch loses its undecodable samples): the counts are
    gathered first, every process pads its rows to the largest count for the collective, and the padding
    is cut out again.

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
        counts = row_counts(x.shape[0], x.device)
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.rows = sum(counts[:rank]), x.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming gradient is not ours
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.rows]


def is_distributed() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_rank() -> int:
    """This process's rank in the process group (0 with one process)."""
    return dist.get_rank() if is_distributed() else 0


def process_count() -> int:
    """The number of processes in the run (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def row_counts(rows: int, device: torch.device) -> list[int]:
    """Every process's `rows`, in rank order (`[rows]` for a single process)."""
    if not is_distributed():
        return [rows]
    counts = torch.tensor([rows], device=device)
    parts = [torch.empty_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, counts)
    return [int(c) for c in parts]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` concatenated along dim 0 in rank order, differentiable (`x` with one process).

    The processes may hold different numbers of rows; the other dimensions must agree.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over all processes, a new tensor (`x` itself with one process); no gradient."""
    if not is_distributed():
        return x
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_processes(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is true on every process: a decision they all take alike."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if is_distributed():
        dist.barrier()


def leave_process_group() -> None:
    """Leave the run's process group at the end, so the launcher sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
