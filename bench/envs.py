"""Who is measured, in which environment, and the worker processes that do it.

clipforge runs with the driver's interpreter (this checkout's venv); OpenCLIP, HF transformers and OpenAI's
`clip` run in the peers' environment (`bench/setup_env.sh`), which has torchvision and its own torch.
clipforge also runs there, as an extra column, so that the difference between the two torch builds shows.

Each contender gets one long-lived worker process (`bench.worker`), so models are built once and the
contenders can be interleaved repetition by repetition; the memory benchmark asks for a fresh one per point.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.timing import Stats, interleave

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEERS_ENV = Path(os.environ.get("CLIPFORGE_BENCH_ENV", ROOT.parent / "benchenv"))
SHARED_BPE = ROOT.parent / "shared" / "assets" / "bpe_simple_vocab_16e6.txt.gz"


@dataclass(frozen=True)
class Contender:
    key: str
    lib: str  # a key of bench.libraries.BUILDERS
    env: str  # "ours" or "peers"
    label: str


CLIPFORGE = Contender("clipforge", "clipforge", "ours", "clipforge")
CONTENDERS = (
    CLIPFORGE,
    Contender("openclip", "openclip", "peers", "OpenCLIP"),
    Contender("hf", "hf", "peers", "HF transformers"),
    Contender("openai", "openai", "peers", "OpenAI clip"),
    Contender("clipforge_peer_torch", "clipforge", "peers", "clipforge on the peers' torch"),
)
PEERS = tuple(c for c in CONTENDERS if c.lib != "clipforge")


@dataclass
class Settings:
    peers_env: Path = DEFAULT_PEERS_ENV
    ours_python: str = sys.executable
    threads: int = os.cpu_count() or 1
    device: str = "cpu"
    reps: int = 5  # timed repetitions per contender and case (median and spread over them)
    warmup_s: float = 1.0  # untimed calls (at least one) for this long before the first repetition
    rep_s: float = 0.3  # a repetition lasts at least this long (short calls are repeated within it)
    scope: str = "default"  # "quick", "default" or "complete": which cases (see each family's `plan`)
    contenders: tuple[str, ...] = tuple(c.key for c in CONTENDERS)  # who is measured (tokenizer: all)
    verbose: bool = False

    def python(self, env: str) -> str:
        return self.ours_python if env == "ours" else str(self.peers_env / "bin" / "python")


class WorkerError(RuntimeError):
    pass


class Unsupported(Exception):
    """The contender's library has no such model (the cell is left empty)."""


class WorkerProcess:
    """A `bench.worker` subprocess; `request` sends one JSON request and returns its answer."""

    _ids = itertools.count()

    def __init__(self, settings: Settings, env: str, log_dir: Path) -> None:
        environ = dict(os.environ)
        # This checkout first; then whatever the caller had (bench/device_run.sh puts its wheels there).
        inherited = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), *inherited])
        if SHARED_BPE.exists():
            environ.setdefault("CLIPFORGE_BPE_PATH", str(SHARED_BPE))
        self.log = log_dir / f"worker-{next(self._ids)}-{env}.log"
        command = [settings.python(env), "-m", "bench.worker", "--threads", str(settings.threads)]
        self.proc = subprocess.Popen(
            [*command, "--device", settings.device],
            cwd=ROOT,
            env=environ,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if settings.verbose else self.log.open("ab"),
            text=True,
        )

    def request(self, op: str, **fields: Any) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise WorkerError(f"worker exited (code {self.proc.wait()}) during {op}:\n{tail}")
        answer = json.loads(line)
        if "unsupported" in answer:
            raise Unsupported(answer["unsupported"])
        if "error" in answer:
            raise WorkerError(f"{op} {fields} failed:\n{answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Measured:
    seconds: Stats  # wall-clock seconds per call, over the repetitions
    info: dict  # what the case reported when it was prepared (parameters, items per call, ...)


class Pool:
    """One live worker per contender, started when first needed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log_dir = Path(tempfile.mkdtemp(prefix="clipforge-bench-"))
        self.workers: dict[str, WorkerProcess] = {}
        self._case_ids = itertools.count()

    def worker(self, contender: Contender) -> WorkerProcess:
        """The contender's worker, started (or restarted, if it died) when needed."""
        if contender.key not in self.workers or self.workers[contender.key].proc.poll() is not None:
            self.workers[contender.key] = WorkerProcess(self.settings, contender.env, self.log_dir)
        return self.workers[contender.key]

    @contextmanager
    def fresh(self, contender: Contender) -> Iterator[WorkerProcess]:
        """A new worker for one job (a clean heap for memory measurements), closed afterwards."""
        process = WorkerProcess(self.settings, contender.env, self.log_dir)
        try:
            yield process
        finally:
            process.close()

    def enabled(self, contenders: tuple[Contender, ...]) -> tuple[Contender, ...]:
        return tuple(c for c in contenders if c.key in self.settings.contenders)

    def run(self, contender: Contender, function: str, **args: Any) -> Any:
        return self.worker(contender).request("run", function=function, args=args)["result"]

    def measure(
        self,
        contenders: tuple[Contender, ...],
        factory: str,
        args: Callable[[Contender], dict],
        reps: int | None = None,
    ) -> dict[str, Measured]:
        """Prepare `factory(**args(c))` in every contender's worker, then time them interleaved."""
        s = self.settings
        case, prepared = f"case-{next(self._case_ids)}", {}
        for c in self.enabled(contenders):
            try:
                info = self.worker(c).request(
                    "prepare", id=case, factory=factory, args=args(c), warmup_s=s.warmup_s, rep_s=s.rep_s
                )
            except Unsupported:
                continue
            prepared[c.key] = info
        timers = {
            key: (lambda w=self.workers[key]: w.request("time", id=case)["seconds"]) for key in prepared
        }
        samples = interleave(timers, reps or s.reps)
        for key in prepared:
            self.workers[key].request("release")
        return {key: Measured(Stats.of(samples[key]), prepared[key]) for key in prepared}

    def stop_workers(self) -> None:
        """End the long-lived workers (they start again when needed), e.g. to free their memory."""
        for process in self.workers.values():
            process.close()
        self.workers.clear()

    def close(self) -> None:
        self.stop_workers()
        shutil.rmtree(self.log_dir, ignore_errors=True)  # errors carried their log's tail already
