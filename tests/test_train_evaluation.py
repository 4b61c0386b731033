"""Training-time evaluation: which set it scores (it follows the data), and a labelled set streamed in
batches, with unusable images left out and counted, as `clipforge eval` does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.configs import apply_overrides
from clipforge.data.synthetic import CLASSNAMES
from clipforge.models import create_model
from clipforge.train.config import TrainConfig
from clipforge.train.evaluation import eval_set, make_evaluator
from clipforge.train.loop import train
from clipforge.transforms import EvalTransform
from conftest import stub_tokenizer, tiny_config
from sample_files import huge_png, labelled_samples, truncated_jpeg, write_shard


def config(*args: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), list(args))


def test_auto_evaluates_the_synthetic_set_only_when_training_on_it():
    assert eval_set(config()) == "synthetic"  # the defaults: synthetic data, eval.data = "auto"
    assert eval_set(config("--data.source", "csv", "--data.path", "d.csv")) == ""
    assert eval_set(config("--data.source", "webdataset", "--data.path", "d.tar")) == ""
    named = ("--data.source", "csv", "--data.path", "d.csv", "--eval.data", "synthetic")
    assert eval_set(config(*named)) == "synthetic"  # named sets are always honoured
    assert eval_set(config("--data.source", "csv", "--data.path", "d.csv", "--eval.data", "e.tar")) == "e.tar"
    assert eval_set(config("--eval.every", "-1")) == ""


def zeroshot_records(run_dir: Path) -> list[dict]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if any(k.startswith("zeroshot_") for k in r)]


def write_csv_data(root: Path, n: int = 16) -> Path:
    """`n` coloured 32 px squares captioned with words of the synthetic set's vocabulary."""
    root.mkdir()
    rows = ["filepath,caption"]
    for i in range(n):
        Image.new("RGB", (32, 32), (15 * i, 255 - 15 * i, 90)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{CLASSNAMES[i % len(CLASSNAMES)]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


def test_a_csv_run_ends_without_a_synthetic_score_and_a_synthetic_run_with_one(
    tmp_path, tokenizer_dir, caplog
):
    short = ("--schedule.steps", "2", "--schedule.warmup_steps", "1", "--eval.every", "0")
    csv = write_csv_data(tmp_path / "data")
    on_csv = ("--data.source", "csv", "--data.path", str(csv), "--data.batch_size", "8")
    with caplog.at_level(logging.INFO, logger="clipforge.train.evaluation"):
        result = train(tiny_config(tmp_path / "csv", tokenizer_dir, *short, *on_csv))
    assert result.zeroshot == {} and zeroshot_records(tmp_path / "csv") == []
    assert "no evaluation configured: training on csv data" in caplog.text
    result = train(tiny_config(tmp_path / "synthetic", tokenizer_dir, *short))
    assert set(result.zeroshot) == {"top1", "top5", "mean_per_class"}
    assert [r["step"] for r in zeroshot_records(tmp_path / "synthetic")] == [2]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_labelled_set_is_streamed_in_batches_and_unusable_images_are_counted(tmp_path, monkeypatch, caplog):
    samples = labelled_samples(["red", "green", "blue"] * 4)
    samples[1]["png"], samples[5]["png"] = truncated_jpeg(), huge_png(12_000, 12_000)
    shard = write_shard(tmp_path / "eval.tar", samples)
    (tmp_path / "classes.json").write_text(json.dumps(["red", "green", "blue"]))
    cfg = config(
        "--data.source", "csv", "--data.path", "unused.csv", "--eval.data", str(shard),
        "--eval.classes", str(tmp_path / "classes.json"), "--eval.batch_size", "4",
    )  # fmt: skip
    decoded = []
    transform_call = EvalTransform.__call__
    monkeypatch.setattr(
        EvalTransform, "__call__", lambda self, image: decoded.append(1) or transform_call(self, image)
    )
    evaluate = make_evaluator(cfg, stub_tokenizer, 32, torch.device("cpu"))
    assert decoded == []  # making the evaluator reads the shard's headers, no image

    torch.manual_seed(0)
    model = create_model("ViT-Micro-16-32")
    batches = []
    encode_image = model.encode_image
    monkeypatch.setattr(
        model, "encode_image", lambda images: batches.append(len(images)) or encode_image(images)
    )
    with caplog.at_level(logging.WARNING):
        scores = evaluate(model)
    assert set(scores) == {"top1", "top5", "mean_per_class"} and 0.0 <= scores["top1"] <= 1.0
    assert batches == [3, 3, 4]  # 12 images in batches of 4, less the two (1 and 5) that cannot be used
    assert "2 image(s) left out (1 corrupt_image, 1 too_large)" in caplog.text
    assert len(decoded) == 10 and model.training  # evaluation restores the mode it found
    batches.clear()
    caplog.clear()
    evaluate(model)  # the set no longer holds the bad images: no decode attempt, no second warning
    assert batches == [4, 4, 2] and "left out" not in caplog.text


def test_a_labelled_set_needs_its_classes(tmp_path):
    cfg = config("--eval.data", str(tmp_path / "eval.tar"))
    with pytest.raises(ValueError, match=r"eval\.classes is required"):
        make_evaluator(cfg, stub_tokenizer, 32, torch.device("cpu"))
