"""int8 against fp32, side by side in one process: is `quantize_int8` faster wherever it is offered?

    python -m bench.int8                  # this CPU
    python -m bench.int8 --emulate-avx2   # also as an AVX2-only CPU without VNNI (a subprocess)

Encodes one batch of random images (random weights, seeded) with three copies of one model: the model as
built (fp32), `for_inference(model)` (fp32, what `clipforge eval` runs) and `quantize_int8(model)`, taking
turns repetition by repetition; prints a markdown table of the best and median throughput and the ratios.

The emulation runs the same measurement in a subprocess whose kernels are limited to AVX2 (PyTorch's own,
oneDNN's, MKL's and fbgemm's, by their environment variables) and where `torch.cpu._is_vnni_supported`, the
test `torch._int_mm` and `fast_int8_matmul` share, answers False. It adds a column "int8 forced": the int8
copy built anyway, with `_int_mm` on the plain loop PyTorch runs without VNNI (one repetition: it is slow).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from bench import machine

AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per copy (after one warm-up call)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see docs/int8.md)")
    p.add_argument("--emulate-avx2", action="store_true", help="also measure as an AVX2-only CPU")
    p.add_argument("--without-vnni", action="store_true", help=argparse.SUPPRESS)  # the emulation's side
    return p.parse_args(argv)


def copies(arch: str, forced: bool) -> dict[str, nn.Module]:
    from clipforge.models import create_model, for_inference, get_config, int8

    torch.manual_seed(0)
    model = create_model(get_config(arch)).eval()
    built = {"fp32": model, "for_inference": for_inference(model), "int8": int8.quantize_int8(model)}
    if forced:  # what quantize_int8 did before it checked the CPU
        forced_copy = for_inference(model)
        int8._replace_children(forced_copy)
        built["int8 forced"] = forced_copy
    return built


def measure(models: dict[str, nn.Module], images: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Images per second of each copy; the copies take turns, so a busier machine slows all alike."""
    calls = {name: (lambda m=m: m.encode_image(images)) for name, m in models.items()}
    if "int8 forced" in models:
        calls["int8 forced"] = lambda: _without_onednn(models["int8 forced"], images)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up: oneDNN and MKL pick and cache their kernels on the first call
        names = list(calls)
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:  # who goes first rotates
                if name == "int8 forced" and len(seconds[name]) == 1:
                    continue  # tens of seconds a call: one repetition tells enough
                seconds[name].append(_timed(calls[name]))
    return {name: [len(images) / s for s in times] for name, times in seconds.items()}


def _without_onednn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # Without VNNI PyTorch runs `_int_mm` as a plain loop; with oneDNN disabled it does so on any CPU.
    with torch.backends.mkldnn.flags(enabled=False):
        return model.encode_image(images)


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def table(rates: dict[str, list[float]], label: str) -> str:
    best = {name: max(r) for name, r in rates.items()}
    lines = [
        f"| {label} | images/s: best (median) | int8 / this, best | int8 / this, median |",
        "|---|---|---|---|",
    ]
    for name, r in rates.items():
        median = statistics.median(r)
        ratio = best["int8"] / best[name]
        ratio_median = statistics.median(rates["int8"]) / median
        lines.append(f"| {name} | {best[name]:.2f} ({median:.2f}) | {ratio:.2f}× | {ratio_median:.2f}× |")
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    from clipforge.models.int8 import fast_int8_matmul

    cpu = machine.cpu()
    kernel = "torch._int_mm (oneDNN)" if fast_int8_matmul() else "none: quantize_int8 keeps fp32"
    return (
        f"- CPU: {cpu['model']}; flags {' '.join(cpu['flags'])}; "
        f"absent: {' '.join(cpu.get('missing_flags', []))}\n"
        f"- torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; fast int8 matmul: {kernel}\n"
        f"- {args.arch} image encoding, batch {args.batch}, {args.reps} repetitions; load average (1 min) "
        f"{os.getloadavg()[0]:.1f}"
    )


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    if args.without_vnni:
        torch.cpu._is_vnni_supported = lambda: False  # the CPU test both torch._int_mm and clipforge use
    models = copies(args.arch, forced=args.without_vnni)
    size = models["fp32"].config.vision.image_size
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    rates = measure(models, images, args.reps)
    label = "emulated AVX2, no VNNI" if args.without_vnni else "this CPU"
    return f"{describe(args)}\n\n{table(rates, label)}\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    print(run(args), flush=True)
    if args.emulate_avx2:
        argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--emulate-avx2"]
        env = {**os.environ, **AVX2_ONLY}
        command = [sys.executable, "-m", "bench.int8", *argv, "--without-vnni"]
        subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
