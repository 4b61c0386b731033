"""Where training metrics go: JSONL always, TensorBoard when installed, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class MetricsLog:
    """Append-only metric records, one JSON object per line with a `step` field.

    `resume_step=k` continues a run from its checkpoint at step k: the records of later steps (which the
    stopped run logged, and this one logs again) are dropped first, so steps never repeat.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        # Line-buffered: a killed run keeps every line written so far.
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the run's lifetime)
        self._tb = _tensorboard_writer(run_dir, resume_step) if tensorboard else None

    def write(self, step: int, **values: Any) -> None:
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step`, atomically (a temporary file renamed over the old one).

    A line a killed run left half-written is not JSON: it is dropped too.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensorboard_writer(run_dir: Path, resume_step: int | None) -> Any | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    # purge_step hides the events the stopped run wrote after its checkpoint, as in metrics.jsonl.
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file; after a resume, the last record of each (key set, step) wins."""
    records: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if up_to_step is None or record["step"] <= up_to_step:
            records[(tuple(sorted(record)), record["step"])] = record
    return sorted(records.values(), key=lambda r: r["step"])


def plot_curves(metrics_path: Path, out_path: Path) -> Path:
    """One panel per metric (loss, learning rate, logit scale, zero-shot accuracy, throughput)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = [
        k
        for k in ("loss", "lr", "logit_scale", "zeroshot_top1", "samples_per_s")
        if any(k in r for r in records)
    ]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        points = [(r["step"], r[key]) for r in records if key in r]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
