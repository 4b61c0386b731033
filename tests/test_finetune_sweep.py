"""`clipforge eval sweep`: the endpoints report what evaluating A and B reports, the report's files, the
models read once, and bad input refused (exit 2, one line, nothing written)."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
import clipforge.checkpoints
from clipforge.cli import main
from clipforge.finetune.sweep import _model_id, parse_alphas
from sample_files import COLOURS, colour_png, read_shard, write_shard  # with conftest's `eval_files`

COMMON = ["--workers", "0", "--batch-size", "8", "--no-progress"]
NAMES = list(COLOURS)


def fine_tune(model: torch.nn.Module, preprocess, tokenizer, shard, steps: int = 25) -> torch.nn.Module:
    """A few full-batch Adam steps of zero-shot cross-entropy on the shard: a model B that, unlike the
    untrained A, tells the colours apart."""
    samples = read_shard(shard).values()
    images = torch.stack([preprocess(Image.open(io.BytesIO(s["png"]))) for s in samples])
    labels = torch.tensor([NAMES.index(json.loads(s["json"])["label"]) for s in samples])
    texts = tokenizer([f"a {c} square" for c in NAMES])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(texts), dim=-1)
        loss = F.cross_entropy(20 * image @ text.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def files(eval_files, tmp_path_factory) -> dict:
    """eval_files plus B (A fine-tuned on its train shard) and a held-out shard of larger, paler squares."""
    root = tmp_path_factory.mktemp("sweep")
    model, preprocess, tokenizer = clipforge.load(eval_files["model"])
    clipforge.save(fine_tune(model, preprocess, tokenizer, eval_files["train"]), root / "b", tokenizer)
    held_out = [
        {"__key__": f"h{i:03d}", "png": colour_png(c, size=20, shade=40 + i), "json": {"label": c}}
        for i, c in enumerate(NAMES * 2)
    ]
    write_shard(root / "held.tar", held_out)
    return {**eval_files, "b": root / "b", "held": root / "held.tar"}


def sweep_argv(files: dict, out, *extra: str) -> list[str]:
    return [
        "eval", "sweep", "--model", str(files["model"]), "--fine-tuned", str(files["b"]),
        "--data", str(files["eval"]), "--held-out", str(files["held"]), "--classes", str(files["classes"]),
        "--templates", "a {} square", "--out", str(out), *COMMON, *extra,
    ]  # fmt: skip


def zeroshot_metrics(model, data, classes, tmp_path) -> dict:
    out = tmp_path / "zs.json"
    argv = ["eval", "zeroshot", "--model", str(model), "--data", str(data), "--classes", str(classes)]
    assert main([*argv, "--templates", "a {} square", "--json", str(out), *COMMON]) == 0
    return json.loads(out.read_text())["metrics"]


@pytest.fixture(scope="module")
def report(files, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(sweep_argv(files, out, "--alphas", "0,0.5,1", "--json", str(out.parent / "also.json"))) == 0
    return {"out": out, "json": json.loads((out / "sweep.json").read_text())}


def test_the_endpoints_report_what_evaluating_a_and_b_reports(files, report, tmp_path) -> None:
    points = {p["alpha"]: p for p in report["json"]["points"]}
    for key, data in (("in_domain", files["eval"]), ("held_out", files["held"])):
        a = zeroshot_metrics(files["model"], data, files["classes"], tmp_path)
        b = zeroshot_metrics(files["b"], data, files["classes"], tmp_path)
        assert points[0.0][key]["metrics"] == a, key
        assert points[1.0][key]["metrics"] == b, key
    assert points[1.0]["in_domain"]["metrics"]["top1"] > points[0.0]["in_domain"]["metrics"]["top1"]


def test_the_report_holds_json_markdown_and_a_plot(report) -> None:
    out, result = report["out"], report["json"]
    assert [p["alpha"] for p in result["points"]] == [0.0, 0.5, 1.0]
    assert result["tasks"]["held_out"]["classes"] == result["tasks"]["in_domain"]["classes"]  # the default
    assert all(p["in_domain"]["n"] == 9 and p["held_out"]["n"] == 6 for p in result["points"])
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| α | in-domain top1 |") and "held-out top1" in table[0]
    assert [row.split(" | ")[0] for row in table[2:5]] == ["| 0", "| 0.5", "| 1"]
    assert any(line.startswith("Best held-out top1: α = ") for line in table)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out.parent / "also.json").read_text()) == result


def test_the_models_are_read_once_and_merged_in_memory(files, tmp_path, monkeypatch) -> None:
    real, calls = clipforge.checkpoints.load, []
    monkeypatch.setattr(clipforge.checkpoints, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(sweep_argv(files, tmp_path / "out", "--alphas", "0,0.3,0.6,1")) == 0
    assert [str(a[0]) for a in calls] == [str(files["model"]), str(files["b"])]


def bad(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("clipforge eval sweep: ")
    return err[0]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    other = tmp_path / "nano"
    clipforge.save(clipforge.create_model("ViT-Nano-16-64"), other)
    missing = [*sweep_argv(files, out), "--held-out", str(tmp_path / "none.tar")]
    assert "not found" in bad(missing, capsys)
    assert "outside [0, 1]" in bad([*sweep_argv(files, out), "--alphas", "0,1.5"], capsys)
    assert "embed_dim" in bad([*sweep_argv(files, out), "--fine-tuned", str(other)], capsys)
    assert "model B" in bad([*sweep_argv(files, out), "--fine-tuned", str(tmp_path / "none")], capsys)
    assert not out.exists()


def test_alphas_are_parsed_and_checked() -> None:
    assert parse_alphas("0, 0.25,1") == [0.0, 0.25, 1.0]
    assert parse_alphas("-0.5,1.5", extrapolate=True) == [-0.5, 1.5]
    for text, message in (("", "empty"), ("0,nan", "finite"), ("0,x", "number"), ("0.5,0.5", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_alphas(text)


def test_cached_features_of_the_endpoints_are_a_and_bs_own() -> None:
    ids = ("a-id", "b-id")
    assert (_model_id(ids, 0.0, False), _model_id(ids, 1.0, True)) == ("a-id", "b-id-int8")
    assert _model_id(ids, 0.5, False) not in ids and _model_id(ids, 0.5, False) != _model_id(ids, 0.25, False)
    assert _model_id(None, 0.5, False) == ""
