"""The huge batch on one machine: the step sweep (`bench.gradcache_memory`) and the loss sweep
(`bench.loss_memory`) in one run, saved as JSON, drawn as one figure, printed as docs/scaling.md's tables.

    python -m bench.scaling --threads 2 --out docs/results/scaling-memory.png
    python -m bench.scaling --from-json docs/results/scaling-memory.json --out docs/results/scaling-memory.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bench import gradcache_memory, loss_memory, machine


def measure(args: argparse.Namespace) -> dict:
    started = time.time()
    facts = {
        "command": "python -m bench.scaling " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "cpu": machine.cpu(),
        "torch": torch.__version__,
        "threads": args.threads,
        "commit": machine.git_commit(Path(__file__).resolve().parent.parent),
        "load_average": [machine.load()[0]],
    }
    print("== training step", flush=True)
    steps = gradcache_memory.sweep(
        args.model, args.batches, args.micro, args.step_chunk, args.max_gib, args.steps, args.threads
    )
    facts["load_average"].append(machine.load()[0])
    print("== loss", flush=True)
    check = loss_memory.check(args.check_batch, args.dim, min(*args.loss_chunks, args.check_batch // 4 + 1))
    print(f"   {json.dumps(check)}", flush=True)
    losses = loss_memory.sweep(args.loss_batches, args.dim, args.loss_chunks, args.max_gib, args.threads)
    facts["load_average"].append(machine.load()[0])
    facts["seconds"] = time.time() - started
    facts["finished"] = f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    return {"facts": facts, "model": args.model, "steps": steps, "check": check, "loss": losses}


def plot(result: dict, path: Path) -> None:
    """Left: memory above the baseline by global batch; right: seconds per step (or per loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(12, 4.8))
    steps = [r for r in result["steps"] if "skipped" not in r]
    for mode in dict.fromkeys((r["micro"], r["chunk"]) for r in steps):
        rows = [r for r in steps if (r["micro"], r["chunk"]) == mode]
        name = f"step, {gradcache_memory.mode_name(*mode)}"
        marker = "o-" if mode == (0, 0) else "s-" if not mode[1] else "D"
        color = "C3" if mode == (0, 0) else "C0" if not mode[1] else "C2"
        x = [r["batch"] for r in rows]
        mem.plot(x, [r["delta_mib"] / 1024 for r in rows], marker, color=color, label=name, ms=6)
        sec.plot(x, [min(r["seconds"]) for r in rows], marker, color=color, label=name, ms=6)
    dim = result["loss"][0]["dim"] if result["loss"] else 0
    for i, chunk in enumerate(dict.fromkeys(r["chunk"] for r in result["loss"])):
        rows = [r for r in result["loss"] if r["chunk"] == chunk]
        name = f"loss only (D={dim}), " + (f"chunk {chunk}" if chunk else "unchunked")
        ran = [r for r in rows if "skipped" not in r]
        color = f"C{4 + i}"
        x = [r["batch"] for r in ran]
        mem.plot(x, [r["delta_mib"] / 1024 for r in ran], "^--", color=color, label=name)
        sec.plot(x, [r["seconds"] for r in ran], "^--", color=color, label=name)
        for r in (r for r in rows if "skipped" in r):  # the prediction that kept it from running
            gib = [ran[-1]["delta_mib"] / 1024, r["predicted_mib"] / 1024]
            mem.plot([x[-1], r["batch"]], gib, ":", color=color)
            mem.plot([r["batch"]], gib[1:], "^", mfc="none", color=color, label=f"{name}, predicted, not run")
    memory = result["facts"]["cpu"].get("memory_gib")
    if memory:
        mem.axhline(memory, color="k", lw=0.8, ls="--", label=f"the machine's memory ({memory} GiB)")
    for ax in (mem, sec):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch")
        ax.grid(True, which="both", lw=0.3)
    mem.set_ylabel("peak RSS above the baseline (GiB)")
    sec.set_ylabel("seconds (one step; loss: forward + backward)")
    mem.set_title(f"{result['model']}, fp32: memory")
    sec.set_title("time")
    mem.legend(fontsize=7)
    fig.suptitle(f"{result['facts']['cpu']['model']}, {result['facts']['threads']} threads", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/results/scaling-memory.png"))
    p.add_argument("--from-json", type=Path, help="measure nothing: draw and print from a saved run")
    p.add_argument("--model", default=gradcache_memory.MODEL)
    p.add_argument("--batches", default="256,512,1024,2048,4096,8192")
    p.add_argument("--micro", type=int, default=64)
    p.add_argument("--step-chunk", type=int, default=1024, help="the cache's loss chunk at the last batch")
    p.add_argument("--steps", type=int, default=1, help="measured steps per point")
    p.add_argument("--loss-batches", default="4096,16384,32768")
    p.add_argument("--loss-chunks", default="4096,1024")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--check-batch", type=int, default=4096)
    p.add_argument("--max-gib", type=float, default=16.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        args.batches = tuple(int(b) for b in args.batches.split(","))
        args.loss_batches = tuple(int(b) for b in args.loss_batches.split(","))
        args.loss_chunks = tuple(int(c) for c in args.loss_chunks.split(","))
        result = measure(args)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out.with_suffix('.json')}")
    print(gradcache_memory.table(result["steps"]) + "\n")
    print(json.dumps(result["check"]) + "\n")
    print(loss_memory.table(result["loss"]))
    plot(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
