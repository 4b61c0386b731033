"""Peak memory of one training step as the batch grows, with and without the gradient cache (CPU).

    python -m bench.gradcache_memory [--model ViT-Nano-8-64] [--batches 256,512,1024,2048] [--micro 256]

Each point runs in a fresh process: it builds the model, the AdamW optimizer and the batch, takes one
warm-up step (so AdamW's moments exist), resets the peak-RSS mark (`/proc/self/clear_refs`, Linux), takes
one measured step (`train_step`, or `gradient_cache_step` with micro-batches of `--micro`) and reports the
peak resident set minus the resident set just before it: activations, gradients and what the allocator
keeps. Without the cache that grows with the batch; with it, only the features and the loss's B x B logits
do. The step time is printed too: the cache encodes everything twice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from bench.machine import reset_peak_rss, rss_mib


def point(model_name: str, batch: int, micro: int) -> dict:
    """Worker side: one measured step's peak RSS above the RSS before it (MiB), and its seconds."""
    from clipforge.models import create_model
    from clipforge.train.steps import gradient_cache_step, train_step

    torch.manual_seed(0)
    model = create_model(model_name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size, context, vocab = model.config.vision.image_size, model.config.text.context_length, 49408
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(1, vocab - 1, (batch, context))
    tokens[:, -1] = vocab - 1

    def step() -> None:
        if micro:
            gradient_cache_step(model, optimizer, images, tokens, micro, 1e-4, "fp32", 0.0)
        else:
            train_step(model, optimizer, images, tokens, 1e-4, "fp32", 0.0)

    step()
    reset_peak_rss()
    before, start = rss_mib("VmRSS"), time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"batch": batch, "micro": micro, "delta_mib": rss_mib("VmHWM") - before, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-Nano-8-64")
    p.add_argument("--batches", default="256,512,1024,2048")
    p.add_argument("--micro", type=int, default=256, help="micro-batch size of the gradient cache")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--point", nargs=2, type=int, metavar=("BATCH", "MICRO"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        print(json.dumps(point(args.model, *args.point)))
        return
    print(f"{args.model}, {torch.get_num_threads()} threads: peak RSS of one step above the RSS before it")
    print(f"{'batch':>6} {'plain MiB':>10} {'cache MiB':>10} {'plain s':>8} {'cache s':>8}")
    for batch in (int(b) for b in args.batches.split(",")):
        rows = []
        for micro in (0, min(args.micro, batch)):
            cmd = [sys.executable, "-m", "bench.gradcache_memory", "--model", args.model]
            cmd += ["--threads", str(args.threads), "--point", str(batch), str(micro)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        plain, cache = rows
        print(
            f"{batch:>6} {plain['delta_mib']:>10.0f} {cache['delta_mib']:>10.0f} "
            f"{plain['seconds']:>8.2f} {cache['seconds']:>8.2f}"
        )


if __name__ == "__main__":
    main()
