"""Peak memory and time of one training step as the global batch grows, with and without the gradient cache.

    python -m bench.gradcache_memory --threads 2 [--model ViT-Nano-8-64] [--batches 256,512,...,8192]
        [--micro 64] [--max-gib 16] [--steps 2]

Each point runs in a fresh process (peak RSS only grows within one): it builds the model, an AdamW optimizer
and a random batch (images and tokens), takes a warm-up step on 8 samples (so AdamW's moments exist and the
kernels are loaded, at negligible activation memory), records the resident set (the baseline: interpreter,
model, optimizer state, the batch), resets the peak mark (`/proc/self/clear_refs`, Linux) and takes `--steps`
steps of the whole batch through the trainer's own step function (`train_step`, or `gradient_cache_step`
with micro-batches of `--micro`). Reported: the peak resident set above the baseline (activations,
gradients, the loss's B x B logits, what the allocator keeps), the absolute peak, and the fastest step.

Without the cache the activation memory grows with the batch; before starting a point the sweep predicts
its peak from the two before it (`bench.points.extrapolate`) and skips it, and every larger batch, when the
prediction exceeds `--max-gib` or 90% of the memory then available.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.machine import reset_peak_rss, rss_mib
from bench.points import extrapolate, in_fresh_process, room_mib

MODEL = "ViT-Nano-8-64"
BATCHES = (256, 512, 1024, 2048, 4096, 8192)
WARMUP_BATCH = 8


def measure_step(model_name: str, batch: int, micro: int, chunk: int, steps: int) -> dict:
    """Worker side (a fresh process): one point, as described in the module docstring. `chunk`: the
    contrastive loss streamed over that many columns (`loss.chunk_size`; 0 = all at once)."""
    from clipforge.models import create_model
    from clipforge.train.loss import BatchLoss
    from clipforge.train.steps import StepParts, step_function

    torch.manual_seed(0)
    model = create_model(model_name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    parts = StepParts.single(model, optimizer, precision="fp32", loss=BatchLoss(chunk=chunk))
    size, context = model.config.vision.image_size, model.config.text.context_length
    vocab = model.token_embedding.num_embeddings
    images = torch.randn(batch, 3, size, size)  # (B, 3, S, S)
    tokens = torch.randint(1, vocab - 1, (batch, context))  # (B, T), the end-of-text token last
    tokens[:, -1] = vocab - 1
    step_function(0)(parts, images[:WARMUP_BATCH], tokens[:WARMUP_BATCH], lr=1e-4)
    step = step_function(micro)
    baseline = rss_mib("VmRSS")
    reset_peak_rss()
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step(parts, images, tokens, lr=1e-4).loss)
        seconds.append(time.perf_counter() - start)
    peak = rss_mib("VmHWM")
    return {
        "batch": batch,
        "micro": micro,
        "chunk": chunk,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "delta_mib": peak - baseline,
        "seconds": seconds,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


def sample_mib(model_name: str) -> float:
    """The batch's own memory per sample (one fp32 image, one row of int64 tokens), in MiB."""
    from clipforge.models import get_config

    config = get_config(model_name)
    return (3 * config.vision.image_size**2 * 4 + config.text.context_length * 8) / 2**20


def sweep(
    model: str = MODEL,
    batches: tuple[int, ...] = BATCHES,
    micro: int = 64,
    chunk: int = 1024,
    max_gib: float = 16.0,
    steps: int = 2,
    threads: int = 0,
) -> list[dict]:
    """Parent side: every point in its own process, the modes of one batch one after the other so that they
    see the same machine load; a mode stops growing where its predicted peak would not fit. The modes: no
    cache, the cache with micro-batches of `micro`, and (at the largest batch only, `chunk` > 0) the cache
    with the loss streamed over `chunk` columns."""
    modes = [(0, 0), (micro, 0)]
    measured: dict[tuple[int, int], list[dict]] = {mode: [] for mode in modes}
    stopped: dict[tuple[int, int], str] = {}
    rows = []
    for batch in batches:
        if chunk and batch == batches[-1]:
            modes.append((micro, chunk))
            measured[(micro, chunk)] = measured[(micro, 0)]  # the same step but for the loss: its growth
        for mode in modes:
            row = {"batch": batch, "micro": mode[0], "chunk": mode[1]}
            # Once a mode is predicted not to fit, every larger batch is skipped without asking again.
            if not stopped.get(mode):
                stopped[mode] = _too_big(model, measured[mode], batch, max_gib)
            if stopped[mode]:
                rows.append({**row, "skipped": stopped[mode]})
                print(f"   {describe(rows[-1])}", flush=True)
                continue
            args = ["--model", model, "--threads", str(threads), "--steps", str(steps), "--point"]
            point = in_fresh_process("bench.gradcache_memory", [*args, *map(str, (batch, *mode))])
            if mode[1] == 0:
                measured[mode].append(point)
            rows.append(point)
            print(f"   {describe(point)}", flush=True)
    return rows


def _too_big(model: str, done: list[dict], batch: int, max_gib: float) -> str:
    """Why a point would not fit, from the points of its mode measured so far ("" if it would)."""
    if not done:
        return ""
    growth = extrapolate([p["batch"] for p in done], [p["delta_mib"] for p in done], batch)
    data = (batch - done[-1]["batch"]) * sample_mib(model)
    predicted, room = done[-1]["baseline_mib"] + data + growth, room_mib(max_gib)
    if predicted <= room:
        return ""
    return f"predicted peak {predicted / 1024:.1f} GiB > {room / 1024:.1f} GiB"


def mode_name(micro: int, chunk: int) -> str:
    if not micro:
        return "no cache"
    return f"micro-batch {micro}" + (f", loss chunk {chunk}" if chunk else "")


def describe(row: dict) -> str:
    name = f"batch {row['batch']:>5}, {mode_name(row['micro'], row['chunk'])}"
    if "skipped" in row:
        return f"{name}: not run, {row['skipped']}"
    return (
        f"{name}: {row['delta_mib']:.0f} MiB above {row['baseline_mib']:.0f} MiB "
        f"(peak {row['peak_mib']:.0f} MiB), fastest step {min(row['seconds']):.2f} s"
    )


def table(rows: list[dict]) -> str:
    """Markdown: per global batch and mode, the peak above the baseline (the absolute peak), the step time,
    and the cache's time relative to no cache."""
    modes = list(dict.fromkeys((r["micro"], r["chunk"]) for r in rows))
    head = ["global batch"]
    for mode in modes:
        head += [f"{mode_name(*mode)}: memory (peak RSS)", "s / step"]
    lines = ["| " + " | ".join([*head, "time, cache / no cache"]) + " |", "|---:" * (len(head) + 1) + "|"]
    for batch in sorted({r["batch"] for r in rows}):
        at = {(r["micro"], r["chunk"]): r for r in rows if r["batch"] == batch}
        cells = [f"{batch:,}"]
        for mode in modes:
            row = at.get(mode)
            if row is None:
                cells += ["", ""]
            elif "skipped" in row:
                cells += [f"not run: {row['skipped']}", ""]
            else:
                memory = f"{row['delta_mib']:,.0f} MiB ({row['peak_mib'] / 1024:.2f} GiB)"
                cells += [memory, f"{min(row['seconds']):.1f}"]
        plain, cache = at.get(modes[0]), at.get(modes[1]) if len(modes) > 1 else None
        ratio = ""
        if plain and cache and "skipped" not in plain and "skipped" not in cache:
            ratio = f"{min(cache['seconds']) / min(plain['seconds']):.2f}x"
        lines.append("| " + " | ".join([*cells, ratio]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--micro", type=int, default=64, help="micro-batch size of the gradient cache")
    p.add_argument("--chunk", type=int, default=1024, help="loss chunk at the largest batch (0: none)")
    p.add_argument("--max-gib", type=float, default=16.0, help="skip points predicted to peak above this")
    p.add_argument("--steps", type=int, default=2, help="measured steps per point (time: the fastest)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--point", nargs=3, type=int, metavar=("BATCH", "MICRO", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        print(json.dumps(measure_step(args.model, *args.point, args.steps)))
        return
    batches = tuple(int(b) for b in args.batches.split(","))
    rows = sweep(args.model, batches, args.micro, args.chunk, args.max_gib, args.steps, args.threads)
    print(f"\n{args.model}, fp32, {torch.get_num_threads()} threads, one step's peak resident memory:\n")
    print(table(rows))


if __name__ == "__main__":
    main()
