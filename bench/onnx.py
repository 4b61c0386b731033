"""The ONNX export against the PyTorch model, side by side in one process: agreement and speed.

    python -m bench.onnx                               # ViT-B-32, random weights, batch 16
    python -m bench.onnx --arch RN-Tiny-64 --batch 8 --reps 3

Exports one seeded random model with `export_onnx` twice (fp32 and fp16) into a temporary directory, then
for each tower (image, text) reports:

- agreement: the largest |onnxruntime - PyTorch| relative to the largest |PyTorch| output, and the
  smallest cosine between the two embeddings of a sample, for the fp32 and the fp16 graph;
- speed: samples per second of `for_inference(model)` in PyTorch (what `clipforge eval` runs) and of the
  fp32 graph in onnxruntime's CPU provider, both with the same thread count, taking turns repetition by
  repetition so that a busier machine slows both alike.

The fp16 graph is not timed: onnxruntime's CPU provider runs most float16 operators by converting them,
so its CPU speed says nothing about a GPU, where float16 is meant to run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import machine


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.onnx", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per runner (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="threads for PyTorch and onnxruntime alike")
    return p.parse_args(argv)


def inputs(config, batch: int) -> dict[str, torch.Tensor]:
    """Seeded images, and token rows with an end-of-text token (the largest id) at varied positions."""
    g = torch.Generator().manual_seed(0)
    size, T, eot = config.vision.image_size, config.text.context_length, config.text.vocab_size - 1
    tokens = torch.randint(1, eot, (batch, T), generator=g)
    for row in range(batch):
        end = 1 + row * 7 % (T - 1)
        tokens[row, end], tokens[row, end + 1 :] = eot, 0
    return {"image": torch.randn(batch, 3, size, size, generator=g), "tokens": tokens}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle onnxruntime threads otherwise spin for a while after each call, taking the cores PyTorch's
    # turn that follows needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    relative = ((got - want).abs().max() / want.abs().max()).item()
    cosine = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1).min().item()
    return relative, cosine


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(calls: dict[str, Callable[[], object]], batch: int, reps: int) -> dict[str, list[float]]:
    for call in calls.values():
        call()  # warm-up: kernels are chosen and cached on the first call
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # who goes first rotates
            seconds[name].append(timed(calls[name]))
    return {name: [batch / s for s in times] for name, times in seconds.items()}


def tower_row(tower: str, paths: dict[str, Path], encode, fast_encode, x: torch.Tensor, args) -> tuple:
    """One tower's agreement (fp32 and fp16 graphs) and speed (PyTorch against the fp32 graph)."""
    want = encode(x)
    sessions = {dtype: session(path, args.threads) for dtype, path in paths.items()}
    feed = {"image" if tower == "image" else "tokens": x.numpy()}
    agree = {d: agreement(torch.from_numpy(s.run(None, feed)[0]), want) for d, s in sessions.items()}
    calls = {"pytorch": lambda: fast_encode(x), "onnxruntime": lambda: sessions["fp32"].run(None, feed)}
    return tower, agree, measure(calls, args.batch, args.reps)


def run(args: argparse.Namespace) -> str:
    from clipforge.convert.onnx import export_onnx
    from clipforge.models import create_model, for_inference, get_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(get_config(args.arch)).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # A fresh ResNet's last BatchNorm of each block is zero, which would hide its residual branches.
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.2, 0.2)
    fast = for_inference(model)
    x = inputs(model.config, args.batch)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        fp32 = export_onnx(model, Path(tmp) / "fp32")
        fp16 = export_onnx(model, Path(tmp) / "fp16", fp16=True)
        rows = [
            tower_row("image", {"fp32": fp32[0], "fp16": fp16[0]}, model.encode_image, fast.encode_image,
                      x["image"], args),
            tower_row("text", {"fp32": fp32[1], "fp16": fp16[1]}, model.encode_text, fast.encode_text,
                      x["tokens"], args),
        ]  # fmt: skip
    return f"{describe(args)}\n\n{table(rows)}\n"


def table(rows: list) -> str:
    lines = [
        "| tower | fp32 graph: max rel. diff / min cos | fp16 graph: max rel. diff / min cos "
        "| PyTorch (for_inference) /s, best (median) | onnxruntime fp32 /s, best (median) "
        "| ORT / PyTorch, best |",
        "|---|---|---|---|---|---|",
    ]
    for tower, agree, rates in rows:
        (r32, c32), (r16, c16) = agree["fp32"], agree["fp16"]
        pt, rt = rates["pytorch"], rates["onnxruntime"]
        lines.append(
            f"| {tower} | {r32:.1e} / {c32:.9f} | {r16:.1e} / {c16:.7f} "
            f"| {max(pt):.1f} ({statistics.median(pt):.1f}) | {max(rt):.1f} ({statistics.median(rt):.1f}) "
            f"| {max(rt) / max(pt):.2f}× |"
        )
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    import onnxruntime

    cpu = machine.cpu()
    return (
        f"- CPU: {cpu['model']}, {os.cpu_count()} cores; load average (1 min) {os.getloadavg()[0]:.1f}\n"
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads each\n"
        f"- {args.arch}, random weights (seed 0; ResNet BatchNorms randomized), batch {args.batch}, "
        f"{args.reps} repetitions"
    )


def main(argv: list[str] | None = None) -> None:
    print(run(parse(argv)), flush=True)


if __name__ == "__main__":
    main()
