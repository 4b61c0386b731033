"""The one way every benchmark times things, and how repetitions become a median and a spread.

In a worker: `warm_up` calls a callable for a while (at least once) and picks how many calls make one
repetition (about `rep_s` seconds, so short calls are not lost in timer noise); `seconds_per_call` times
one repetition by the wall clock, synchronizing the GPU when there is one. In the driver: `interleave` asks
every contender for one repetition in turn, rotating who goes first, so a machine that gets busier slows all
contenders alike; `Stats` summarizes the repetitions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], calls: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def warm_up(fn: Callable[[], object], device: str, warmup_s: float, rep_s: float) -> tuple[int, float]:
    """Call `fn` once, then until `warmup_s` has passed; return (calls per repetition, last call's time)."""
    spent = last = seconds_per_call(fn, 1, device)
    while spent < warmup_s:
        last = seconds_per_call(fn, 1, device)
        spent += last
    return max(1, round(rep_s / max(last, 1e-9))), last


@dataclass(frozen=True)
class Stats:
    """A median with its spread over repetitions (min-max and the interquartile range)."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        s = sorted(samples)
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
        return cls(statistics.median(s), s[0], s[-1], q1, q3, tuple(samples))

    def map(self, f: Callable[[float], float]) -> Stats:
        """The same statistics of f(sample) for a monotonic f (e.g. seconds -> items per second)."""
        return Stats.of([f(x) for x in self.samples])


def interleave(contenders: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """`reps` rounds; each round calls every contender once, the first one moving by one each round."""
    names = list(contenders)
    results: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(contenders[name]())
    return results
