"""The distributed building blocks: World from the launcher's environment, and 2 gloo processes x B/2 training
a tiny two-tower model exactly as 1 process x B does (loss, gradients, parameters after one step)."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.distributed.world import World, gather_with_grad, init_process_group
from clipforge.train.loss import BatchLoss, sharded_contrastive_loss, sharded_sigmoid_loss
from conftest import free_port

# ---- World from the environment ----


def test_world_defaults_to_a_single_process():
    world = World.from_env({})
    assert (world.rank, world.world_size, world.local_rank, world.is_main) == (0, 1, 0, True)


def test_world_reads_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert World.from_env(env) == World(rank=5, world_size=8, local_rank=1)
    assert not World.from_env(env).is_main


def test_world_reads_slurm_variables_and_torchrun_wins_when_both_are_set():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    assert World.from_env(slurm) == World(rank=3, world_size=4, local_rank=1)
    both = {**slurm, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    assert World.from_env(both) == World(rank=0, world_size=2, local_rank=0)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "two", "WORLD_SIZE": "4"}, "RANK='two'"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4, WORLD_SIZE=4"),
    ],
)
def test_world_refuses_bad_variables_naming_them(env, message):
    with pytest.raises(ValueError, match=message):
        World.from_env(env)


def test_single_process_needs_no_group_and_gathers_itself():
    init_process_group(World(), torch.device("cpu"))  # nothing to join
    assert not dist.is_initialized()
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_sharded_losses_refuse_a_world_without_a_process_group():
    x = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match="2 processes expected"):
        sharded_contrastive_loss(x, x, torch.tensor(1.0), rank=0, world=2)
    with pytest.raises(ValueError, match="2 processes expected"):
        sharded_sigmoid_loss(x, x, torch.tensor(1.0), torch.tensor(0.0), rank=0, world=2)


# ---- 2 processes x B/2 == 1 process x B ----

BATCH, IMAGE_IN, TEXT_IN, EMBED = 8, 6, 5, 4
WORLD = 2


@dataclass(frozen=True)
class Case:
    loss: str  # "contrastive" or "sigmoid"
    chunk: int | None  # columns per block (the sharded sigmoid loss: the BatchLoss form only)
    dtype: torch.dtype
    optimizer: str  # "sgd" or "adamw"
    # The trainer's BatchLoss with rank 0 holding 3 of the 8 pairs and rank 1 the other 5 (samples skipped
    # on one process), instead of the even-split sharded losses.
    uneven: bool = False

    @property
    def name(self) -> str:
        split = "-uneven" if self.uneven else ""
        return f"{self.loss}-{self.chunk}-{str(self.dtype)[6:]}-{self.optimizer}{split}"


CASES = [
    Case("contrastive", None, torch.float64, "sgd"),
    Case("contrastive", 3, torch.float64, "adamw"),  # 3 does not divide the 8 columns
    Case("sigmoid", None, torch.float64, "sgd"),
    Case("sigmoid", None, torch.float64, "adamw"),
    Case("contrastive", None, torch.float32, "sgd"),
    Case("sigmoid", None, torch.float32, "sgd"),
    Case("contrastive", None, torch.float64, "adamw", uneven=True),
    Case("contrastive", 3, torch.float64, "sgd", uneven=True),
    Case("sigmoid", None, torch.float64, "adamw", uneven=True),
    Case("sigmoid", 3, torch.float64, "sgd", uneven=True),
]


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, IMAGE_IN, generator=g, dtype=dtype)
    return images, torch.randn(BATCH, TEXT_IN, generator=g, dtype=dtype)


def one_step(case: Case, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This process's share of one training step of a two-linear-tower model: its loss, the (DDP-averaged)
    gradients and the parameters after the optimizer step."""
    torch.manual_seed(1)  # the same initial weights everywhere, as DDP broadcasts them
    towers = torch.nn.ModuleDict(
        {"image": torch.nn.Linear(IMAGE_IN, EMBED), "text": torch.nn.Linear(TEXT_IN, EMBED)}
    ).to(case.dtype)
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=case.dtype))
    bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=case.dtype))
    params = {**dict(towers.named_parameters()), "logit_scale": scale, "logit_bias": bias}
    images, texts = batch(case.dtype)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    if case.uneven and world > 1:
        rows = slice(0, 3) if rank == 0 else slice(3, BATCH)
    image_features = F.normalize(towers["image"](images[rows]), dim=-1)
    text_features = F.normalize(towers["text"](texts[rows]), dim=-1)
    if case.uneven:
        loss = BatchLoss(case.loss, case.chunk or 0)(image_features, text_features, scale, bias)
        if case.loss == "contrastive":
            bias.grad = torch.zeros_like(bias)
    elif case.loss == "contrastive":
        loss = sharded_contrastive_loss(image_features, text_features, scale, rank, world, case.chunk)
        bias.grad = torch.zeros_like(bias)  # unused: every process steps the same parameters
    else:
        loss = sharded_sigmoid_loss(image_features, text_features, scale, bias, rank, world)
    loss.backward()
    for p in params.values():
        if world > 1:  # what DDP does: average the gradients over processes
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world
    grads = {name: p.grad.clone() for name, p in params.items()}
    opt_class = torch.optim.SGD if case.optimizer == "sgd" else torch.optim.AdamW
    opt_class(params.values(), lr=0.1).step()
    return {"loss": loss.detach(), **{f"grad.{k}": g for k, g in grads.items()}} | {
        f"param.{k}": p.detach().clone() for k, p in params.items()
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_process_group(World(rank, WORLD, rank), torch.device("cpu"))
    results = {case.name: one_step(case, rank, WORLD) for case in CASES}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, str(out_dir))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD, "a gloo worker failed or timed out"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def tolerance(case: Case) -> float:
    """The allowed difference, relative to the largest magnitude of the quantity compared.

    The runs differ only in the order of floating-point sums: each reported value is reached through sums
    of at most N^2 pair terms (N = 8) plus dot products of length <= 6, on logits scaled by at most 10, and
    each addition rounds by at most eps relative to the running magnitude. fp32: (N^2 + 6) * 10 * eps
    (~8e-5; a wrong gradient route is off by O(1) of the value). fp64: that bound is ~1e-13, so 1e-6 is
    the meaningful check the brief asks for, with a wide margin.
    """
    if case.dtype == torch.float64:
        return 1e-6
    return (BATCH**2 + IMAGE_IN) * 10 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_processes_step_exactly_as_one_process_on_the_whole_batch(two_process_results, case):
    reference = one_step(case, rank=0, world=1)
    ranks = [r[case.name] for r in two_process_results]
    rel = tolerance(case)
    loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2  # the logged loss: the mean over processes
    assert abs(loss - reference["loss"]) <= rel * abs(reference["loss"])
    for key, want in reference.items():
        if key == "loss":
            continue
        for rank, got in enumerate(ranks):
            # Gradients and parameters must agree on every process (DDP keeps the replicas equal).
            err = (got[key] - want).abs().max().item()
            assert err <= rel * want.abs().max().item() + 1e-300, f"{key} on rank {rank}: off by {err:.3g}"
