"""A benchmark worker: one process per library and environment, driven by JSON lines on stdin/stdout.

    python -m bench.worker --threads 2 --device cpu      # started by `bench.envs.Worker`, not by hand

Requests (one JSON object a line), answered by one JSON object a line:
  {"op": "prepare", "id": ..., "factory": "bench.encoding:make_case", "args": {...},
   "warmup_s": 1.0, "rep_s": 0.3}
      build a zero-argument callable with `factory(**args, device=...)`, warm it up and pick its calls per
      repetition; answers {"calls": n, "first_s": ..., **info the factory gave}, or {"unsupported": why}
  {"op": "time", "id": ...}                      -> {"seconds": wall-clock seconds per call, one repetition}
  {"op": "release"}                              -> drop every prepared callable (and cached model)
  {"op": "run", "function": "module:function", "args": {...}}  -> {"result": what the function returns}
Errors answer {"error": "traceback"}. Anything a library prints goes to stderr, never into the protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

from bench.timing import seconds_per_call, warm_up


def resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Worker:
    def __init__(self, device: str) -> None:
        self.device = device
        self.cases: dict[str, Callable[[], object]] = {}
        self.calls: dict[str, int] = {}

    def prepare(self, id: str, factory: str, args: dict, warmup_s: float, rep_s: float) -> dict:
        from bench.libraries import Unsupported

        try:
            fn, info = resolve(factory)(**args, device=self.device)
        except Unsupported as exc:
            return {"unsupported": str(exc)}
        self.cases[id] = fn
        self.calls[id], first = warm_up(fn, self.device, warmup_s, rep_s)
        return {"calls": self.calls[id], "first_s": first, **info}

    def time(self, id: str) -> dict:
        return {"seconds": seconds_per_call(self.cases[id], self.calls[id], self.device)}

    def release(self) -> dict:
        from bench import libraries

        self.cases.clear()
        libraries.clear_cache()
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        with contextlib.suppress(OSError, AttributeError):  # glibc: give freed heap pages back to the OS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return {}

    def run(self, function: str, args: dict) -> dict:
        return {"result": resolve(function)(**args, device=self.device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print (or warn on stdout) must not corrupt the protocol
    sys.stdout = sys.stderr
    torch.set_num_threads(opts.threads)
    worker = Worker(opts.device)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            answer = getattr(worker, op)(**request)
        except Exception:
            answer = {"error": traceback.format_exc()}
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
