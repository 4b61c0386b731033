"""Memory points measured one per fresh process, and the growth law used to skip the ones that would not fit.

Peak RSS (`VmHWM`) only ever grows within a process, so each point of a memory sweep runs in a new Python
process: `python -m MODULE --point ...` prints one JSON object. Before starting a point, the sweep predicts
its peak from the points before it (`extrapolate`) and skips it if the prediction exceeds a bound, so a
sweep never pushes the machine into swapping or the OOM killer.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


def in_fresh_process(module: str, args: list[str]) -> dict:
    """Run `python -m module *args` in a new interpreter and parse the JSON object on its last stdout line."""
    cmd = [sys.executable, "-m", module, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolate(sizes: list[int], values: list[float], size: int, lo: float = 1.0, hi: float = 2.0) -> float:
    """`values` carried on to `size` along a power law fitted through the last two points.

    The exponent p (value ~ size^p) is the measured one, clamped to [lo, hi]: activations grow linearly with
    the batch (p = 1), logits quadratically (p = 2). With a single point the exponent is `hi`, the cautious
    guess. Sizes must be increasing and values positive.
    """
    if not sizes or len(sizes) != len(values):
        raise ValueError(f"need matching, non-empty sizes and values, got {len(sizes)} and {len(values)}")
    if len(sizes) == 1:
        p = hi
    else:
        (s0, s1), (v0, v1) = sizes[-2:], values[-2:]
        p = math.log(max(v1, 1e-9) / max(v0, 1e-9)) / math.log(s1 / s0)
        p = min(max(p, lo), hi)
    return values[-1] * (size / sizes[-1]) ** p


def available_mib() -> float:
    """What Linux says can still be allocated without swapping (`MemAvailable`), in MiB."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def room_mib(max_gib: float) -> float:
    """The largest peak a new point may be predicted to reach: the bound, or 90% of what is free if less."""
    return min(max_gib * 1024, 0.9 * available_mib())
