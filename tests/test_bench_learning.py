"""bench.learning: reading the loss curves of both trainers on one axis of samples seen."""

from __future__ import annotations

import json
from pathlib import Path

from bench.learning import loss_curve


def test_an_openclip_log_counts_samples_across_epochs(tmp_path: Path) -> None:
    # OpenCLIP's sample counter restarts with each epoch; the curve's does not.
    line = "2026-12-06,00:38:09 | INFO | Train Epoch: {e} [ {n:>5}/256 ({p}%)] Loss: {loss} (0.5)"
    log = tmp_path / "out.log"
    log.write_text(
        "\n".join(
            [
                "2026-12-06,00:20:00 | INFO | Start epoch 0",
                line.format(e=0, n=128, p=50, loss="4.5"),
                line.format(e=0, n=256, p=100, loss="4.0"),
                line.format(e=1, n=128, p=50, loss="3.5"),
            ]
        )
    )
    assert loss_curve(log) == ([128, 256, 384], [4.5, 4.0, 3.5])


def test_a_clipforge_run_counts_samples_by_its_batch_size(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[data]\nbatch_size = 64\n")
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "loss": 4.2}, {"step": 15, "eval": {"top1": 0.1}}, {"step": 20, "loss": 3.9}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert loss_curve(metrics) == ([640, 1280], [4.2, 3.9])
