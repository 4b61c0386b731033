"""Suites: every task kind on a saved tiny model (conftest's `eval_files`), a written report, and a feature
cache that is hit."""

import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
from clipforge.evaluate import load_suite, run_suite
from clipforge.models import CLIP
from conftest import write_suite
from sample_files import read_shard


def direct_zeroshot(files: dict) -> tuple[dict[str, float], int]:
    """Per-class zero-shot accuracy computed here, from the public API only (load, preprocess, encode):
    the suite's "colours" task on the same model, images and prompt. Also the number of images whose two
    best classes are within 1e-4 in cosine, whose prediction rounding alone could flip."""
    model, preprocess, tokenizer = clipforge.load(files["model"])
    classes = json.loads(files["classes"].read_text())
    samples = read_shard(files["eval"]).values()
    images = torch.stack([preprocess(Image.open(io.BytesIO(s["png"]))) for s in samples])
    labels = torch.tensor([classes.index(json.loads(s["json"])["label"]) for s in samples])
    with torch.no_grad():
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(tokenizer([f"a {c} square" for c in classes])), dim=-1)
    cosines = image @ text.T
    top2 = cosines.topk(2, dim=1).values
    correct = cosines.argmax(dim=1) == labels
    per_class = {c: correct[labels == i].float().mean().item() for i, c in enumerate(classes)}
    return per_class, int((top2[:, 0] - top2[:, 1] < 1e-4).sum())


@pytest.fixture
def count_encoder_calls(monkeypatch) -> dict[str, int]:
    calls = {"image": 0, "text": 0}
    encode_image, encode_text = CLIP.encode_image, CLIP.encode_text

    def counting_image(self, images):
        calls["image"] += 1
        return encode_image(self, images)

    def counting_text(self, tokens):
        calls["text"] += 1
        return encode_text(self, tokens)

    monkeypatch.setattr(CLIP, "encode_image", counting_image)
    monkeypatch.setattr(CLIP, "encode_text", counting_text)
    return calls


def test_suite_runs_every_task_writes_a_report_and_hits_the_cache_the_second_time(
    eval_files, tmp_path, count_encoder_calls
):
    suite = load_suite(write_suite(tmp_path / "suite.toml", eval_files, tmp_path / "out", tmp_path / "cache"))
    first = run_suite(suite)
    assert [r.kind for r in first.results] == ["zeroshot", "retrieval", "linear-probe"]
    # Misses: the eval images (embedding), the captions, the probe's train and test images (pre-projection);
    # retrieval then finds the eval images' embeddings that zero-shot stored.
    assert (first.cache_misses, first.cache_hits) == (4, 1)
    assert count_encoder_calls["image"] > 0

    count_encoder_calls.update(image=0, text=0)
    second = run_suite(suite)
    assert (second.cache_misses, second.cache_hits) == (0, 5)
    assert count_encoder_calls["image"] == 0  # only the zero-shot classifier's prompts are encoded again
    assert [r.metrics for r in second.results] == [r.metrics for r in first.results]

    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in report["results"]] == [
        "colours",
        "retrieval eval.tar",
        "linear-probe eval.tar",
    ]
    zeroshot = report["results"][0]
    per_class, near_ties = direct_zeroshot(eval_files)
    assert zeroshot["n"] == 9 and zeroshot["per_class"].keys() == per_class.keys()
    # Each class has 3 images: an image whose prediction rounding could flip moves its class by 1/3.
    for name, accuracy in per_class.items():
        assert abs(zeroshot["per_class"][name] - accuracy) <= near_ties / 3 + 1e-6, name
    expected_top1 = sum(per_class.values()) / 3  # 3 images per class: the mean of the per-class rates
    assert zeroshot["metrics"]["top1"] == pytest.approx(expected_top1, abs=near_ties / 9 + 1e-6)
    table = (tmp_path / "out" / "results.md").read_text()
    assert (
        "| colours | zeroshot | top1 |" in table and "| linear-probe eval.tar | linear-probe | C |" in table
    )
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changing_the_data_file_misses_the_cache(eval_files, tmp_path):
    suite = load_suite(write_suite(tmp_path / "suite.toml", eval_files, tmp_path / "out", tmp_path / "cache"))
    suite.task = suite.task[:1]
    assert run_suite(suite).cache_misses == 1
    assert run_suite(suite).cache_hits == 1
    stat = os.stat(eval_files["eval"])
    os.utime(eval_files["eval"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run_suite(suite).cache_misses == 1
