"""The training loop: batches in, loss steps, metrics, checkpoints and zero-shot scores out.

`train(config)` is the whole run; each part of it is a small method of `Trainer` below, and the optimizer
step itself is a step strategy from `train/steps.py`. Nothing here parses flags or knows about files beyond
the run directory.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.configs import dump_toml, to_dict
from clipforge.data import build_train_loader
from clipforge.data.samples import SKIP_REASONS, derive_seed
from clipforge.distributed.parallel import data_parallel
from clipforge.distributed.world import (
    World,
    barrier,
    init_process_group,
    leave_process_group,
    sum_over_processes,
)
from clipforge.models import CLIP
from clipforge.tokenizer import get_tokenizer
from clipforge.train.checkpointing import (
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_sharded_checkpoint,
)
from clipforge.train.config import TrainConfig
from clipforge.train.ema import WeightAverage
from clipforge.train.evaluation import eval_set, make_evaluator
from clipforge.train.loss import BatchLoss
from clipforge.train.metrics import CURVES_FILE, MetricsLog, plot_curves
from clipforge.train.model import build_model, max_log_scale
from clipforge.train.optim import PAPER_ADAM, WarmupCosine, make_optimizer
from clipforge.train.progress import Progress
from clipforge.train.steps import StepParts, StepResult, TrainingForward, parameters_finite, step_function
from clipforge.train.validate import validate_run

log = logging.getLogger("clipforge.train")


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many skipped updates in a row, or an update that made the parameters
    non-finite); nothing more is written, and the message names the last checkpoint, if any."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float
    zeroshot: dict[str, float]
    samples_per_s: float
    skipped: dict[str, int]


def setup_runtime(cfg: TrainConfig, world: World | None = None) -> torch.device:
    """Seeds, threads and device: the same config on the same machine gives the same run. Every process
    is seeded alike, so all start from the same weights; a process uses the GPU of its local rank."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world is not None and world.world_size > 1:
        device = f"cuda:{world.local_rank}"
    return torch.device(device)


def build_optimizer(cfg: TrainConfig, model: CLIP) -> torch.optim.AdamW:
    beta1, beta2, eps = PAPER_ADAM[model.config.vision.kind]
    o = cfg.optim
    betas = (beta1 if o.beta1 is None else o.beta1, beta2 if o.beta2 is None else o.beta2)
    eps = eps if o.eps is None else o.eps
    return make_optimizer(model, o.lr, o.weight_decay, betas, eps, layer_decay=o.layer_decay)


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    """The run directory, made, with the resolved config in it."""
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    return run_dir


class Throughput:
    """Samples per second of the training steps alone (data loading included; evaluation and
    checkpoints excluded), overall and over the last `window` steps."""

    def __init__(self, window: int = 20):
        self._times: list[tuple[float, int]] = []
        self._window, self._t0 = window, 0.0
        self._total_time, self._total_samples = 0.0, 0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, samples: int) -> None:
        elapsed = time.perf_counter() - self._t0
        self._times = [*self._times[-(self._window - 1) :], (elapsed, samples)]
        self._total_time += elapsed
        self._total_samples += samples

    def recent(self) -> float:
        return sum(n for _, n in self._times) / max(1e-9, sum(t for t, _ in self._times))

    def overall(self) -> float:
        return self._total_samples / max(1e-9, self._total_time)


class Trainer:
    """Everything one run holds: model, optimizer, schedule, data, evaluator, counters, run directory."""

    last_checkpoint: Path | None = None  # the newest checkpoint this run wrote

    def __init__(self, cfg: TrainConfig, resume: str = ""):
        self.cfg = cfg
        self.world = World.from_env()  # torchrun's or SLURM's variables; one process without them
        self.device = setup_runtime(cfg, self.world)
        init_process_group(self.world, self.device)
        self.run_dir = Path(cfg.run.out_dir)  # made last, so a failure on the way leaves nothing behind
        self.tokenizer = get_tokenizer(cfg.model.tokenizer or None)
        self.model = build_model(cfg, self.tokenizer.vocab_size).to(self.device)
        self.parallel = data_parallel(
            TrainingForward(self.model, cfg.run.precision), self.world, cfg.run.strategy, self.device
        )
        self.optimizer = build_optimizer(cfg, self.model)  # after sharding: FSDP2 replaces the parameters
        self.parts = StepParts(
            self.model,
            self.optimizer,
            self.parallel.forward,
            BatchLoss(cfg.loss.name, cfg.loss.chunk_size),
            cfg.optim.grad_clip,
            max_log_scale(cfg.loss),
            self.parallel.no_sync,
        )
        # The whole batch at once, or a gradient cache over micro-batches: the same update either way.
        self.step_function = step_function(cfg.data.micro_batch_size)
        s = cfg.schedule
        self.schedule = WarmupCosine(cfg.optim.lr, s.warmup_steps, s.steps, s.final_lr)
        image_size = self.model.config.vision.image_size
        w = self.world
        self.data = build_train_loader(
            cfg.data, self.tokenizer, image_size, seed=cfg.run.seed, rank=w.rank, world_size=w.world_size
        )
        # One process reports: it evaluates, logs and writes the run directory.
        self.evaluates = bool(eval_set(cfg))
        self.evaluate = make_evaluator(cfg, self.tokenizer, image_size, self.device) if w.is_main else None
        # Counters that a checkpoint carries: batches drawn (the data position), skipped samples by reason.
        self.state: dict[str, Any] = {"step": 0, "batches": 0, "skipped": {}, "last_zeroshot": {}}
        self.resuming = bool(resume)  # from a checkpoint, or from step 0 if the run has none yet
        checkpoint = resolve_resume(self.run_dir, resume)
        if checkpoint is not None:
            self.state.update(load_checkpoint(checkpoint, self.model, self.optimizer))
            log.info("resumed from %s at step %d", checkpoint, self.state["step"])
        # The weights' moving average (optim.ema), made from the weights the run starts with.
        self.average = WeightAverage(self.model, cfg.optim.ema) if cfg.optim.ema > 0 else None
        if self.average is not None and checkpoint is not None and not self.average.load(checkpoint):
            log.warning("%s holds no weight average: it restarts from the restored weights", checkpoint)
        if w.is_main:
            _prepare_run_dir(cfg)

    def run(self) -> TrainResult:
        main = self.world.is_main
        # A resumed run drops what the stopped one logged after its checkpoint: it logs those steps anew.
        metrics = (
            MetricsLog(self.run_dir, resume_step=self.state["step"] if self.resuming else None)
            if main
            else SilentMetrics()
        )
        progress = Progress(
            self.cfg.schedule.steps, self.state["step"], enabled=self.cfg.run.progress and main
        )
        try:
            result = self._loop(metrics, progress)
        finally:
            progress.close()
            metrics.close()
            leave_process_group()
        if main:
            plot_curves(metrics.path, self.run_dir / CURVES_FILE)
        return result

    def _loop(self, metrics: MetricsLog, progress: Progress) -> TrainResult:
        cfg, state = self.cfg, self.state
        batches = self.data.batches(start_batch=state["batches"])
        speed, bad_in_a_row, loss = Throughput(), 0, float("nan")
        while state["step"] < cfg.schedule.steps:
            step = state["step"]
            speed.start()
            batch = next(batches)
            samples = self._count_batch(batch)
            if samples == 0:  # every sample of this global batch was skipped (and counted)
                continue
            result = self._step(batch, step)
            if not result.finite:
                bad_in_a_row += 1
                self._on_bad_step(step, result, bad_in_a_row)
                continue
            speed.stop(samples)
            bad_in_a_row, loss = 0, result.loss
            state["step"] = step = step + 1
            if self.average is not None:
                self.average.update(self.model, step)
            self._report(step, result, speed.recent(), metrics, progress)
            self._maybe_evaluate(step, metrics, progress)
            self._maybe_checkpoint(step)
        return TrainResult(
            self.run_dir,
            state["step"],
            loss,
            dict(state["last_zeroshot"]),
            speed.overall(),
            dict(state["skipped"]),
        )

    def _step(self, batch, step: int) -> StepResult:
        images = batch.images.to(self.device, non_blocking=True)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        # Random draws in the step (patch dropout) come from (seed, step, process): a resumed run draws
        # what the stopped one would have, with no generator state to save.
        torch.manual_seed(derive_seed(self.cfg.run.seed, "step", step, self.world.rank))
        return self.step_function(self.parts, images, tokens, self.schedule(step))

    def _count_batch(self, batch) -> int:
        """Count the batch drawn and its skipped samples over all processes; return its global size."""
        self.state["batches"] += 1
        counts = [len(batch)] + [batch.skipped.get(reason, 0) for reason in SKIP_REASONS]
        total = sum_over_processes(torch.tensor(counts, device=self.device)).tolist()
        skipped = self.state["skipped"]
        for reason, count in zip(SKIP_REASONS, total[1:], strict=True):
            skipped[reason] = skipped.get(reason, 0) + count
        return total[0]

    def _on_bad_step(self, step: int, result: StepResult, bad_in_a_row: int) -> None:
        """A failed update. `step` updates are done, so this one would have been step `step + 1`: the
        number metrics.jsonl and checkpoints give the update that follows `step`."""
        attempt = step + 1
        if result.non_finite == "parameters":
            raise TrainingStopped(
                f"stopped at step {attempt}: the update made the parameters non-finite (loss "
                f"{result.loss:.4g}, gradient norm {result.grad_norm:.4g}, lr {self.schedule(step):.3g}); "
                f"{self._last_checkpoint_note()}. Try a lower optim.lr or an optim.grad_clip"
            )
        # A non-finite loss is never backpropagated, so it has no gradient norm to show.
        values = (
            f"{result.loss}" if result.non_finite == "loss" else f"{result.grad_norm}, loss {result.loss:.4g}"
        )
        log.warning("step %d: non-finite %s (%s); update skipped", attempt, result.non_finite, values)
        if bad_in_a_row >= self.cfg.run.max_bad_steps:
            raise TrainingStopped(
                f"stopped at step {attempt}: {bad_in_a_row} updates in a row skipped, the last for a "
                f"non-finite {result.non_finite}; {self._last_checkpoint_note()}. Try a lower optim.lr, "
                "an optim.grad_clip, or run.precision = 'fp32'"
            )

    def _last_checkpoint_note(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written by this run"
        return f"the last checkpoint this run wrote is {self.last_checkpoint}"

    def _report(
        self, step: int, result: StepResult, rate: float, metrics: MetricsLog, progress: Progress
    ) -> None:
        lr, scale = self.schedule(step - 1), self.model.logit_scale.exp().item()
        bias = {} if self.model.logit_bias is None else {"logit_bias": self.model.logit_bias.item()}
        skipped = self.state["skipped"]
        progress.update(step, loss=result.loss, lr=lr, scale=scale, skipped=sum(skipped.values()), rate=rate)
        if step % self.cfg.run.log_every == 0 or step == self.cfg.schedule.steps:
            metrics.write(
                step,
                loss=result.loss,
                lr=lr,
                logit_scale=scale,
                **bias,
                grad_norm=result.grad_norm,
                samples_per_s=rate,
                skipped=dict(skipped),
            )

    def _maybe_evaluate(self, step: int, metrics: MetricsLog, progress: Progress) -> None:
        every, last = self.cfg.eval.every, step == self.cfg.schedule.steps
        if not self.evaluates or not (last or (every > 0 and step % every == 0)):
            return
        model = self.parallel.whole_model(self.model)  # gathered on rank 0 when sharded: all take part
        if self.evaluate is None:
            return
        scores = self.evaluate(model if self.average is None else self.average.model)
        self.state["last_zeroshot"] = scores
        metrics.write(step, **{f"zeroshot_{k}": v for k, v in scores.items()})
        progress.note(f"step {step}: zero-shot " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def _maybe_checkpoint(self, step: int) -> None:
        every, last = self.cfg.run.checkpoint_every, step == self.cfg.schedule.steps
        if not (last or (every > 0 and step % every == 0)):
            return
        if not parameters_finite(self.optimizer):  # `train_step` stops first; a checkpoint never holds one
            raise TrainingStopped(
                f"step {step}: non-finite parameters, not saved; {self._last_checkpoint_note()}"
            )
        trainer_state = {k: self.state[k] for k in ("batches", "skipped", "last_zeroshot")}
        trainer_state["config"] = to_dict(self.cfg)
        keep = self.cfg.run.keep_checkpoints
        average = None if self.average is None else self.average.model
        if self.parallel.sharded:  # each process writes its shards
            whole = self.parallel.whole_model(self.model)
            self.last_checkpoint = save_sharded_checkpoint(
                self.run_dir, step, self.model, whole, self.optimizer, trainer_state, self.tokenizer, keep
            )
        elif self.world.is_main:  # every process holds the same model and optimizer state
            self.last_checkpoint = save_checkpoint(
                self.run_dir, step, self.model, self.optimizer, trainer_state, self.tokenizer, keep, average
            )
        barrier()  # no process runs ahead of a checkpoint that is still being written


class SilentMetrics:
    """The metrics log of a process that does not report."""

    path = None

    def write(self, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: TrainConfig, resume: str = "") -> TrainResult:
    """Run (or, with `resume` = "latest" or a checkpoint path, continue) the training `cfg` describes.

    Everything the run needs is checked first (`validate_run`): a bad config raises `ConfigError` and
    writes nothing."""
    validate_run(cfg, resume)
    return Trainer(cfg, resume).run()
