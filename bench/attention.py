"""Attention as SDPA or as explicit matmuls, side by side: where does `attend` pick the faster one?

    python -m bench.attention    # 2 threads; bf16 and fp32; training (forward + backward) and encoding

For each shape (the attention of named towers at typical batches, and lengths around the switch), SDPA
(`F.scaled_dot_product_attention`) and `explicit_attention` take turns repetition by repetition on the same
q, k, v; the table gives the median milliseconds of each, their ratio and which one `attend` runs. The
switch (`EXPLICIT_ATTENTION_MAX_TOKENS`, bf16 on a CPU only) was set from this table.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench import machine
from bench.timing import interleave, seconds_per_call

# (what, batch, heads, tokens, head width, causal)
SHAPES = [
    ("ViT-Mini-8-64 image (64 px, patch 8)", 128, 3, 65, 64, False),
    ("ViT-Mini-8-64 text (context 32)", 128, 3, 32, 64, True),
    ("ViT-B-32 image (224 px)", 128, 12, 50, 64, False),
    ("ViT-B-32 text (context 77)", 64, 8, 77, 64, True),
    ("100 tokens", 64, 8, 100, 64, False),
    ("128 tokens", 64, 8, 128, 64, False),
    ("ViT-B-16 image (224 px)", 32, 12, 197, 64, False),
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each (after two warm-up calls)")
    return p.parse_args(argv)


def _call(kind: str, q, k, v, causal: bool, train: bool) -> Callable[[], None]:
    from clipforge.models.layers import explicit_attention

    forward = {
        "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "explicit": lambda: explicit_attention(q, k, v, causal),
    }[kind]

    def call() -> None:
        with torch.set_grad_enabled(train):
            out = forward()
            if train:
                out.float().sum().backward()

    return call


def milliseconds(shape: tuple, dtype: torch.dtype, train: bool, reps: int) -> dict[str, float]:
    _, batch, heads, tokens, width, causal = shape
    g = torch.Generator().manual_seed(0)
    size = (batch, heads, tokens, width)
    q, k, v = (torch.randn(size, generator=g).to(dtype).requires_grad_(train) for _ in range(3))
    calls = {kind: _call(kind, q, k, v, causal, train) for kind in ("SDPA", "explicit")}
    for call in calls.values():
        seconds_per_call(call, 2, "cpu")  # warm-up
    timed = {kind: (lambda c=call: 1000 * seconds_per_call(c, 1, "cpu")) for kind, call in calls.items()}
    return {kind: statistics.median(t) for kind, t in interleave(timed, reps).items()}


def table(reps: int) -> str:
    from clipforge.models.layers import uses_explicit_attention

    lines = [
        "| attention of | B × H × T | dtype | pass | SDPA ms | explicit ms | SDPA / explicit | `attend` |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for shape in SHAPES:
        what, batch, heads, tokens, width, _ = shape
        for dtype in (torch.bfloat16, torch.float32):
            explicit = uses_explicit_attention(torch.empty(1, 1, tokens, width, dtype=dtype))
            picks = "explicit" if explicit else "SDPA"
            for train in (True, False):
                ms = milliseconds(shape, dtype, train, reps)
                lines.append(
                    f"| {what} | {batch} × {heads} × {tokens} | {str(dtype).removeprefix('torch.')} | "
                    f"{'train' if train else 'encode'} | {ms['SDPA']:.1f} | {ms['explicit']:.1f} | "
                    f"{ms['SDPA'] / ms['explicit']:.2f}× | {picks} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    cpu = machine.cpu()
    absent = " ".join(cpu.get("missing_flags", []))
    print(
        f"- CPU: {cpu['model']}; flags {' '.join(cpu['flags'])}; absent: {absent}\n"
        f"- torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} threads, {args.reps} repetitions (median); "
        f"load average (1 min) {os.getloadavg()[0]:.1f}\n"
        "- train = forward and backward of the attention alone; encode = forward without autograd\n",
        flush=True,
    )
    print(table(args.reps), flush=True)


if __name__ == "__main__":
    main()
