"""Where training metrics go: JSONL always, TensorBoard when installed, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class MetricsLog:
    """Append-only metric records, one JSON object per line with a `step` field."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / METRICS_FILE
        # Line-buffered: a killed run keeps every line written so far.
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the run's lifetime)
        self._tb = _tensorboard_writer(run_dir) if tensorboard else None

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


def _tensorboard_writer(run_dir: Path) -> Any | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


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
