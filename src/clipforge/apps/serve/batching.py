"""One queue for every model call: jobs from many requests, batched, run by one worker thread.

A request submits a job -- N preprocessed images (N, 3, S, S) or N tokenized texts (N, L) -- and gets a
`Future` for its (N, D) features. The worker takes the first waiting job, gathers more for up to
`max_wait` seconds or until `max_batch` rows are waiting, and runs each kind's rows through the model in
calls of at most `max_batch` rows. Concurrent requests so share model calls (a larger matrix product costs
less per row than many small ones), and only the worker thread runs the model: PyTorch's own threads
parallelize each call, and no two requests compete for them.

A batched call that raises is retried job by job, so the error reaches only the request that caused it;
the worker never stops on an error. With `batching=False` each job runs alone as it arrives: the same path,
for a side-by-side comparison.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import torch

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class QueueStats:
    jobs: int = 0  # jobs submitted
    rows: int = 0  # images + texts encoded
    model_calls: int = 0  # encoder calls: fewer than jobs when requests were batched together
    failed_jobs: int = 0
    largest_call: int = 0  # most rows in one call


@dataclass
class _Job:
    kind: str
    inputs: torch.Tensor
    future: Future


class BatchQueue:
    """Run `encoders[kind](inputs)` for jobs from any thread, batching jobs that arrive close together."""

    def __init__(
        self,
        encoders: Mapping[str, Encoder],
        max_batch: int = 32,
        max_wait: float = 0.005,
        batching: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.encoders = dict(encoders)
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.batching = batching
        self._stats = QueueStats()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="clipforge-batch-queue", daemon=True)
        self._thread.start()

    def submit(self, kind: str, inputs: torch.Tensor) -> Future:
        """A Future for `encoders[kind](inputs)`: (N, D) features of the N rows of `inputs`."""
        if kind not in self.encoders:
            raise ValueError(f"unknown job kind {kind!r}; known: {sorted(self.encoders)}")
        if self._closed:
            raise RuntimeError("the batch queue is closed")
        future: Future = Future()
        with self._lock:
            self._stats.jobs += 1
        self._queue.put(_Job(kind, inputs, future))
        return future

    def run(self, kind: str, inputs: torch.Tensor) -> torch.Tensor:
        """`submit` and wait for the result (from a thread other than the worker)."""
        return self.submit(kind, inputs).result()

    def stats(self) -> dict:
        with self._lock:
            return asdict(self._stats)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------
    # The worker
    # ------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            for kind in dict.fromkeys(job.kind for job in jobs):  # kinds in arrival order
                self._run_jobs([job for job in jobs if job.kind == kind])
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """`first` and whatever arrives within `max_wait` (up to `max_batch` rows); whether to stop after."""
        jobs = [first]
        if not self.batching:
            return jobs, False
        rows = len(first.inputs)
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.inputs)
        return jobs, False

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Encode the jobs' rows together and hand each job its slice; on an error, each job alone."""
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            features = self._encode(jobs[0].kind, torch.cat([job.inputs for job in jobs]))
        except Exception as error:
            if len(jobs) > 1:
                for job in jobs:  # find the job at fault; the others still get their answers
                    self._retry_alone(job)
                return
            with self._lock:
                self._stats.failed_jobs += 1
            jobs[0].future.set_exception(error)
            return
        start = 0
        for job in jobs:
            job.future.set_result(features[start : start + len(job.inputs)])
            start += len(job.inputs)

    def _retry_alone(self, job: _Job) -> None:
        try:
            job.future.set_result(self._encode(job.kind, job.inputs))
        except Exception as error:
            with self._lock:
                self._stats.failed_jobs += 1
            job.future.set_exception(error)

    def _encode(self, kind: str, inputs: torch.Tensor) -> torch.Tensor:
        encoder = self.encoders[kind]
        outputs = []
        with torch.no_grad():
            for start in range(0, len(inputs), self.max_batch):
                chunk = inputs[start : start + self.max_batch]
                with self._lock:
                    self._stats.model_calls += 1
                    self._stats.rows += len(chunk)
                    self._stats.largest_call = max(self._stats.largest_call, len(chunk))
                outputs.append(encoder(chunk))
        if not outputs:
            raise ValueError(f"a {kind} job with no rows")
        return torch.cat(outputs)
