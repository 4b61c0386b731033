"""FSDP2 and sharded checkpoints: 2 gloo processes with a sharded tiny CLIP train as 2 processes with whole
replicas (DDP's update) and as 1 process on the whole batch; a sharded checkpoint saved by 2 processes
loads into 2 and into 1 (and one saved by 1 into 2) and training goes on as if never stopped; the
unsharded weights gathered on rank 0 are the model's and load with `clipforge.load`.

Tolerances: the runs compute the same sums in different orders (per process, then reduced), so they
differ by rounding alone: `rounding_rtol` of the tower's depth and widest sum, doubled depth for forward
and backward, as in test_train_steps.py. AdamW moves a parameter by lr * m / (sqrt(v) + eps), which a
gradient error e changes by at most about 2 * lr / eps * e per step (through m and through v); eps = lr
here keeps that factor at 2, so rounding cannot be amplified past the bound. Reloaded state and a run
continued from it are compared exactly: the same process count runs the same arithmetic.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

import clipforge
from clipforge.checkpoints.native import save_native
from clipforge.distributed.fsdp import full_model, full_state_dict, load_sharded, save_sharded, shard_model
from clipforge.distributed.world import World, init_process_group
from clipforge.train.steps import parameters_finite
from conftest import free_port, run_processes
from fsdp_tiny import (
    BATCH,
    CASES,
    CONTEXT,
    EPS,
    LR,
    MAX_NORM,
    RESUME,
    STEPS,
    WORLD,
    Case,
    batch,
    build,
    moments,
    optimizer_for,
    parameters,
    train,
)
from tolerances import rounding_budget, rounding_rtol


def sharded_names(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))


# ---- what the 2 processes do ----


def worker(rank: int, port: int, out_dir: str, checkpoint_w1: str, tokenizer_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_process_group(World(rank, WORLD, rank), torch.device("cpu"))
    out, results = Path(out_dir), {}
    for case in CASES:
        replica = build(case)
        replicated = train(replica, optimizer_for(replica), case, range(STEPS), rank, WORLD, replicated=True)
        # Rank 1 starts from other weights: shard_model must hand every process rank 0's.
        model = shard_model(build(case, seed=rank))
        initial = full_state_dict(model)
        optimizer = optimizer_for(model)
        sharded = train(model, optimizer, case, range(STEPS), rank, WORLD, replicated=False)
        results[case.name] = {
            "replicated": replicated,
            "replicated_params": parameters(replica),
            "sharded": sharded,
            "sharded_params": parameters(model),
            "initial_full": initial,
            "final_full": full_state_dict(model),
            "sharded_modules": sharded_names(model),
            "forward": model(*batch(case, 0))[0].detach() if not case.checkpointing else None,
        }
    results["resume"] = resume(rank, out, Path(checkpoint_w1), tokenizer_dir)
    results["nan_seen"] = nan_in_one_shard(rank)
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def resume(rank: int, out: Path, checkpoint_w1: Path, tokenizer_dir: str) -> dict:
    """Save at W=2 after 2 steps and go on for a third; reload into a fresh sharded model and take the third
    step again; load the W=1 checkpoint the test wrote; write rank 0's whole model for clipforge.load."""
    case = RESUME
    model = shard_model(build(case))
    optimizer = optimizer_for(model)
    train(model, optimizer, case, range(2), rank, WORLD, replicated=False)
    save_sharded(out / "w2", model, optimizer)
    saved = {"params": parameters(model), "moments": moments(model, optimizer)}
    whole = full_model(model)
    if rank == 0:
        save_native(whole, out / "native", clipforge.get_tokenizer(tokenizer_dir))
    train(model, optimizer, case, range(2, 3), rank, WORLD, replicated=False)
    continued = parameters(model)

    fresh = shard_model(build(case, seed=7))
    fresh_optimizer = optimizer_for(fresh)
    load_sharded(out / "w2", fresh, fresh_optimizer)
    loaded = {"params": parameters(fresh), "moments": moments(fresh, fresh_optimizer)}
    train(fresh, fresh_optimizer, case, range(2, 3), rank, WORLD, replicated=False)

    from_w1 = shard_model(build(case, seed=7))
    from_w1_optimizer = optimizer_for(from_w1)
    load_sharded(checkpoint_w1, from_w1, from_w1_optimizer)
    return {
        "saved": saved,
        "loaded": loaded,
        "continued": continued,
        "resumed": parameters(fresh),
        "whole_is_none": whole is None,
        "from_w1": {"params": parameters(from_w1), "moments": moments(from_w1, from_w1_optimizer)},
    }


def nan_in_one_shard(rank: int) -> bool:
    """parameters_finite on every process after a NaN lands in rank 1's shard only."""
    model = shard_model(build(RESUME))
    optimizer = optimizer_for(model)
    train(model, optimizer, RESUME, range(1), rank, WORLD, replicated=False)
    if rank == 1:
        with torch.no_grad():
            model.visual.proj.to_local().view(-1)[0] = float("nan")
    return parameters_finite(optimizer)


# ---- the runs ----


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    # A checkpoint saved by a single process without a process group, for the W=2 processes to load.
    model = build(RESUME)
    optimizer = optimizer_for(model)
    train(model, optimizer, RESUME, range(1), rank=0, world=1, replicated=False)
    save_sharded(out / "w1", model, optimizer)
    w1 = {"params": parameters(model), "moments": moments(model, optimizer)}
    args = (free_port(), str(out), str(out / "w1"), str(tokenizer_dir))
    run_processes(worker, WORLD, args, timeout=240)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return {"ranks": ranks, "out": out, "w1": w1}


def tolerance(case: Case) -> float:
    """Relative (to a tensor's largest magnitude) rounding bound of a gradient of the case's model."""
    config = case.config()
    depth, terms = max(rounding_budget(config, t) for t in ("image", "text"))
    return rounding_rtol(torch.float32, 2 * depth, max(terms, BATCH * CONTEXT))


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: off by {diff:.3g} (allowed {atol:.3g})"


def check_same_training(got: list[dict], got_params: dict, want: list[dict], want_params: dict, case, who):
    """Gradient norms and clipped gradients at each step, then the parameters, within rounding.

    A step's gradient is one result, compared relative to its largest element: some of its elements are
    sums that cancel to nearly nothing (an attention pool's key bias has an exact gradient of 0, since a
    softmax ignores a shift shared by all keys), and their rounding is that of the terms they sum.
    """
    rtol, moved = tolerance(case), 0.0
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=rtol), f"{who}: gradient norm, step {step}"
        assert g["grads"].keys() == w["grads"].keys(), f"{who}: which parameters got gradients"
        scale = max(grad.abs().max().item() for grad in w["grads"].values())
        for name, grad in w["grads"].items():
            assert_close(g["grads"][name], grad, rtol * scale, f"{who}: gradient of {name}, step {step}")
        moved += 2 * LR / EPS * rtol * scale  # AdamW's amplification of this step's gradient error
    for name, param in want_params.items():
        bound = moved + 2 * STEPS * torch.finfo(torch.float32).eps * param.abs().max().item()
        assert_close(got_params[name], param, bound, f"{who}: {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fsdp_trains_as_ddp_and_as_one_process(runs, case):
    ranks = [r[case.name] for r in runs["ranks"]]
    for rank, result in enumerate(ranks):
        who = f"{case.name} rank {rank}"
        assert result["sharded"][0]["grad_norm"] > MAX_NORM, "clipping must bind for the test to check it"
        ddp = ranks[0]["replicated"], ranks[0]["replicated_params"]
        check_same_training(result["sharded"], result["sharded_params"], *ddp, case, f"FSDP vs DDP, {who}")
        # Every process reports the same global norm, and holds the same whole parameters.
        assert result["sharded"][-1]["grad_norm"] == ranks[0]["sharded"][-1]["grad_norm"]
    if case.whole_batch:
        model = build(case)
        reference = train(model, optimizer_for(model), case, range(STEPS), rank=0, world=1, replicated=False)
        fsdp = ranks[0]["sharded"], ranks[0]["sharded_params"]
        check_same_training(*fsdp, reference, parameters(model), case, "FSDP vs 1 process")
    if case.max_log_scale < math.inf:  # the clamp bound at the first step (it starts at log(1/0.07))
        assert build(case).logit_scale.item() > case.max_log_scale
        assert ranks[0]["sharded_params"]["logit_scale"].item() <= case.max_log_scale


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rank0_gathers_the_whole_state_dict(runs, case):
    rank0, rank1 = (r[case.name] for r in runs["ranks"])
    # Right after sharding: exactly rank 0's initial weights (rank 1 built other ones), OpenAI's keys.
    want = build(case).state_dict()
    assert list(rank0["initial_full"]) == list(want)
    for key, value in want.items():
        assert torch.equal(rank0["initial_full"][key], value), key
    assert rank1["initial_full"] == {} and rank1["final_full"] == {}
    # After training: the parameters every process can see, gathered.
    for name, param in rank0["sharded_params"].items():
        assert torch.equal(rank0["final_full"][name], param), name
    # The sharded model computes the same logits as an unsharded one with its weights.
    if rank0["forward"] is not None:
        model = build(case)
        model.load_state_dict(rank0["final_full"])
        logits = model(*batch(case, 0))[0].detach()
        assert_close(rank0["forward"], logits, tolerance(case) * logits.abs().max().item(), "forward")


def test_blocks_of_both_towers_are_sharded_by_type(runs):
    vit, resnet = runs["ranks"][0][CASES[0].name], runs["ranks"][0][CASES[3].name]
    assert vit["sharded_modules"] == ["", "transformer.resblocks.0", "visual.transformer.resblocks.0"]
    text = [f"transformer.resblocks.{i}" for i in range(6)]
    image = ["visual.attnpool", *(f"visual.layer{i}.0" for i in range(1, 5))]
    assert resnet["sharded_modules"] == sorted(["", *text, *image])


def test_a_nan_in_one_process_shard_is_seen_by_all(runs):
    assert [r["nan_seen"] for r in runs["ranks"]] == [False, False]


def test_sharded_checkpoint_reloads_exactly_at_two_processes(runs):
    for rank, result in enumerate(r["resume"] for r in runs["ranks"]):
        for kind in ("params", "moments"):
            saved, loaded = result["saved"][kind], result["loaded"][kind]
            assert saved.keys() == loaded.keys()
            for key, value in saved.items():
                assert torch.equal(loaded[key], value), f"rank {rank}: {kind} {key}"
        # One more step from the reloaded state is the step the run took without stopping.
        for name, value in result["continued"].items():
            assert torch.equal(result["resumed"][name], value), f"rank {rank}: {name} after resuming"


def test_two_process_checkpoint_loads_into_one_process(runs):
    rank0 = runs["ranks"][0]["resume"]
    assert not dist.is_initialized()  # a single process, no process group
    model = build(RESUME, seed=7)
    optimizer = optimizer_for(model)
    load_sharded(runs["out"] / "w2", model, optimizer)
    for kind, got in (("params", parameters(model)), ("moments", moments(model, optimizer))):
        assert got.keys() == rank0["saved"][kind].keys()
        for key, value in rank0["saved"][kind].items():
            assert torch.equal(got[key], value), f"{kind} {key}"
    # Going on with the whole batch in one process is the 2-process run's third step, within rounding.
    records = train(model, optimizer, RESUME, range(2, 3), rank=0, world=1, replicated=False)
    rtol = tolerance(RESUME)
    scale = max(grad.abs().max().item() for grad in records[0]["grads"].values())
    for name, value in rank0["continued"].items():
        bound = 2 * LR / EPS * rtol * scale + 2 * torch.finfo(torch.float32).eps * value.abs().max().item()
        assert_close(parameters(model)[name], value, bound, name)


def test_one_process_checkpoint_loads_into_two_processes(runs):
    for result in (r["resume"]["from_w1"] for r in runs["ranks"]):
        for kind in ("params", "moments"):
            assert result[kind].keys() == runs["w1"][kind].keys()
            for key, value in runs["w1"][kind].items():
                assert torch.equal(result[kind][key], value), f"{kind} {key}"


def test_rank0_writes_a_model_directory_that_clipforge_loads(runs):
    rank0, rank1 = (r["resume"] for r in runs["ranks"])
    assert rank1["whole_is_none"] and not rank0["whole_is_none"]
    model, _, _ = clipforge.load(str(runs["out"] / "native"))
    for name, value in rank0["saved"]["params"].items():
        assert torch.equal(model.state_dict()[name], value), name
