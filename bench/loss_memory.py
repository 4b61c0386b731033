"""The contrastive loss's own memory and time at huge batches: all B x B logits at once, or in chunks.

    python -m bench.loss_memory --threads 2 [--batches 4096,8192,16384,32768] [--dim 512]
        [--chunks 1024,4096] [--max-gib 16]

Each point runs in a fresh process: B random L2-normalized image and text features of `--dim` (leaves that
require gradients, like the gradient cache's), a warm-up forward and backward at B = 256, the baseline
resident set, then one forward and backward of the loss at B, timed; reported is the peak resident set above
the baseline. Unchunked is `contrastive_loss` (the trainer's loss with `loss.chunk_size = 0`); chunked is
`chunked_cross_entropy` in both directions, `chunk` columns at a time (`loss.chunk_size = chunk`).

Unchunked, the forward alone holds four B x B fp32 matrices (each direction's logits and its log-softmax),
16 GiB at B = 32,768, and the backward more; the sweep predicts each point from the ones before it and skips
those that would exceed `--max-gib` (or 90% of the free memory). Before the sweep, the chunked loss and its
gradients are compared with the unchunked ones at B = `--check-batch`, in float64 and float32.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from bench.machine import reset_peak_rss, rss_mib
from bench.points import extrapolate, in_fresh_process, room_mib

BATCHES = (4096, 8192, 16384, 32768)
CHUNKS = (1024, 4096)


def loss_of(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """The one-process training loss: `contrastive_loss`, or both directions chunked (`chunk` > 0)."""
    from clipforge.train.loss import chunked_cross_entropy, contrastive_loss

    if not chunk:
        return contrastive_loss(images, texts, logit_scale)
    per_image = chunked_cross_entropy(images, texts, logit_scale, 0, chunk)
    per_text = chunked_cross_entropy(texts, images, logit_scale, 0, chunk)
    return (per_image + per_text) / 2


def features(batch: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Normalized image and text features (B, dim) and the initial log logit scale, all requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    # Each text near its image, so that the loss is a trained model's rather than log(B).
    texts = F.normalize(images + 0.5 * torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    return [t.requires_grad_() for t in (images, texts, logit_scale)]


def measure_loss(batch: int, dim: int, chunk: int) -> dict:
    """Worker side (a fresh process): one point, as described in the module docstring."""
    warmup = features(256, dim)
    loss_of(*warmup, min(chunk, 256)).backward()
    del warmup
    inputs = features(batch, dim)
    baseline = rss_mib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    loss = loss_of(*inputs, chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    return {
        "batch": batch,
        "dim": dim,
        "chunk": chunk,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "delta_mib": peak - baseline,
        "seconds": seconds,
        "loss": loss.item(),
        "threads": torch.get_num_threads(),
    }


def check(batch: int, dim: int, chunk: int) -> dict:
    """The chunked loss and gradients against the unchunked ones: the largest difference relative to the
    largest value, for the loss and each input's gradient, in float64 and float32."""
    result = {"batch": batch, "dim": dim, "chunk": chunk}
    for dtype in (torch.float64, torch.float32):
        got = []
        for c in (0, chunk):
            inputs = features(batch, dim, dtype)
            loss = loss_of(*inputs, c)
            loss.backward()
            got.append([loss.detach(), *(t.grad for t in inputs)])
        names = ("loss", "image grad", "text grad", "logit scale grad")
        result[str(dtype).removeprefix("torch.")] = {
            name: float((a - b).abs().max() / a.abs().max()) for name, a, b in zip(names, *got, strict=True)
        }
    return result


def sweep(
    batches: tuple[int, ...] = BATCHES,
    dim: int = 512,
    chunks: tuple[int, ...] = CHUNKS,
    max_gib: float = 16.0,
    threads: int = 0,
) -> list[dict]:
    """Parent side: each (batch, chunk) point in its own process; unchunked points predicted not to fit are
    listed with the prediction instead of being run."""
    rows, unchunked = [], []
    for batch in batches:
        for chunk in (0, *chunks):
            row = {"batch": batch, "dim": dim, "chunk": chunk}
            if not chunk and unchunked:
                sizes, deltas = [p["batch"] for p in unchunked], [p["delta_mib"] for p in unchunked]
                predicted, room = extrapolate(sizes, deltas, batch), room_mib(max_gib)
                row["predicted_mib"] = predicted
                if unchunked[-1]["baseline_mib"] + predicted > room:
                    row["skipped"] = f"predicted {predicted / 1024:.1f} GiB > {room / 1024:.1f} GiB"
                    rows.append(row)
                    print(f"   {describe(row)}", flush=True)
                    continue
            args = ["--threads", str(threads), "--point", str(batch), str(dim), str(chunk)]
            point = in_fresh_process("bench.loss_memory", args)
            if not chunk:
                unchunked.append(point)
            rows.append({**row, **point})
            print(f"   {describe(rows[-1])}", flush=True)
    return rows


def describe(row: dict) -> str:
    name = f"B {row['batch']:>5}, " + (f"chunk {row['chunk']}" if row["chunk"] else "unchunked")
    if "skipped" in row:
        return f"{name}: not run, {row['skipped']}"
    return f"{name}: {row['delta_mib']:,.0f} MiB above the baseline, {row['seconds']:.1f} s forward+backward"


def table(rows: list[dict]) -> str:
    """Markdown: per batch, each form's peak memory above the baseline and its forward+backward time."""
    chunks = list(dict.fromkeys(r["chunk"] for r in rows))
    head = ["B"]
    for chunk in chunks:
        name = f"chunk {chunk:,}" if chunk else "unchunked"
        head += [f"{name}: memory", "s"]
    lines = ["| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
    for batch in sorted({r["batch"] for r in rows}):
        cells = [f"{batch:,}"]
        for chunk in chunks:
            row = next((r for r in rows if r["batch"] == batch and r["chunk"] == chunk), None)
            if row is None:
                cells += ["", ""]
            elif "skipped" in row:
                cells += [f"not run: {row['predicted_mib'] / 1024:.0f} GiB predicted", ""]
            else:
                cells += [f"{row['delta_mib']:,.0f} MiB", f"{row['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--dim", type=int, default=512, help="feature dimension (ViT-B/32's embed dim: 512)")
    p.add_argument("--chunks", default=",".join(map(str, CHUNKS)))
    p.add_argument("--max-gib", type=float, default=16.0, help="skip points predicted to peak above this")
    p.add_argument("--check-batch", type=int, default=4096, help="compare chunked with unchunked here")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--point", nargs=3, type=int, metavar=("BATCH", "DIM", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        print(json.dumps(measure_loss(*args.point)))
        return
    chunks = tuple(int(c) for c in args.chunks.split(","))
    # A chunk that splits the check's columns into several blocks, the last one partial.
    print(json.dumps(check(args.check_batch, args.dim, min(*chunks, args.check_batch // 4 + 1))))
    batches = tuple(int(b) for b in args.batches.split(","))
    rows = sweep(batches, args.dim, chunks, args.max_gib, args.threads)
    threads = torch.get_num_threads()
    print(f"\ncontrastive loss, D = {args.dim}, fp32, {threads} threads, forward + backward:\n")
    print(table(rows))


if __name__ == "__main__":
    main()
