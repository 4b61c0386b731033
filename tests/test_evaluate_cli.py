"""`clipforge eval ...` smoke tests: each subcommand prints a table and writes --json."""

import csv
import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.models import quantize_int8
from conftest import write_suite
from sample_files import huge_png, labelled_samples, read_shard, truncated_jpeg, write_shard

COMMON = ["--workers", "0", "--batch-size", "4", "--no-progress"]


def retrieval_near_ties(files: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """(delta, near): delta = the largest change int8 makes to an image-caption cosine (the label as the
    caption, one per image), and for each direction, per query, how many wrong items score within
    2 * delta + 1e-5 of the right one in fp32. Computed here, from load, preprocess and quantize_int8."""
    model, preprocess, tokenizer = clipforge.load(files["model"])
    samples = read_shard(files["eval"]).values()
    images = torch.stack([preprocess(Image.open(io.BytesIO(s["png"]))) for s in samples])
    captions = [json.loads(s["json"])["label"] for s in samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without fast int8 products the copy keeps fp32 layers, and says so
        int8 = quantize_int8(model)
    scores = {}
    with torch.no_grad():
        for name, m in (("fp32", model), ("int8", int8)):
            image = F.normalize(m.encode_image(images), dim=-1)
            scores[name] = image @ F.normalize(m.encode_text(tokenizer(captions)), dim=-1).T
    delta = (scores["int8"] - scores["fp32"]).abs().max().item()
    s, right = scores["fp32"], scores["fp32"].diagonal()
    # image -> text: caption j competes with image i's own. One with the same text ties with it only if
    # both are encoded bit for bit alike: int8 kernels (AMX, VNNI) may round a row differently with the
    # batch it is in, and a tie counts against the model, so a duplicate caption is a near tie too.
    i2t = (s - right[:, None]).abs() <= 2 * delta + 1e-5
    i2t.fill_diagonal_(False)
    t2i = (s - right[None, :]).abs() <= 2 * delta + 1e-5  # text -> image: image i competes with image j
    t2i.fill_diagonal_(False)
    return delta, {"i2t": i2t.sum(dim=1), "t2i": t2i.sum(dim=0)}


def test_zeroshot_prints_a_table_and_writes_json_and_the_confusion_matrix(eval_files, tmp_path, capsys):
    out, confusion = tmp_path / "zs.json", tmp_path / "confusion.csv"
    code = main(
        ["eval", "zeroshot", "--model", str(eval_files["model"]), "--data", str(eval_files["eval"]),
         "--classes", str(eval_files["classes"]), "--templates", "a {} square", "--json", str(out),
         "--confusion", str(confusion), *COMMON]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "9 images (0 skipped)" in printed and "top1" in printed and "mean_per_class" in printed
    result = json.loads(out.read_text())
    assert result["kind"] == "zeroshot" and set(result["metrics"]) == {"top1", "top5", "mean_per_class"}
    assert result["templates"] == ["a {} square"] and set(result["per_class"]) == {"red", "green", "blue"}
    rows = list(csv.reader(confusion.open()))
    assert rows[0] == ["true \\ predicted", "red", "green", "blue"]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 9


def test_linear_probe_reports_accuracy_and_the_chosen_c(eval_files, tmp_path, capsys):
    out = tmp_path / "lp.json"
    code = main(
        ["eval", "linear-probe", "--model", str(eval_files["model"]), "--train", str(eval_files["train"]),
         "--test", str(eval_files["eval"]), "--json", str(out), *COMMON]
    )  # fmt: skip
    assert code == 0 and " C " in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n_train"] + result["n_val"] == 18 and result["n_test"] == 9
    # The chosen C is the sweep's best validation accuracy, a tie going to the smaller C (the stronger
    # regularization); the sweep starts from the paper's coarse grid 1e-6, 1e-4, ..., 1e6.
    sweep = {float(c): accuracy for c, accuracy in result["sweep"].items()}
    best = max(sweep.values())
    assert result["C"] == min(c for c, accuracy in sweep.items() if accuracy == best)
    assert result["val_top1"] == sweep[result["C"]]
    assert {10.0**e for e in range(-6, 7, 2)} <= set(sweep)


def test_retrieval_reports_both_directions(eval_files, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        ["eval", "retrieval", "--model", str(eval_files["model"]), "--data", str(eval_files["eval"]),
         "--caption-key", "json:label", "--json", str(out), *COMMON]
    )  # fmt: skip
    assert code == 0 and "i2t_R@1" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n_images"] == result["n_texts"] == 9
    assert {"i2t_R@10", "t2i_R@5", "t2i_median_rank"} <= set(result["metrics"])


def test_suite_command_writes_the_report(eval_files, tmp_path, capsys):
    suite = write_suite(
        tmp_path / "suite.toml", eval_files, tmp_path / "ignored", tmp_path / "cache", probe=False
    )
    assert main(["eval", "suite", str(suite), "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "feature cache: 1 hits, 2 misses" in printed and "t2i_R@1" in printed
    assert (tmp_path / "report" / "results.md").is_file() and not (tmp_path / "ignored").exists()


def test_errors_are_reported_not_raised(eval_files, tmp_path, capsys):
    missing = str(tmp_path / "none.tar")
    code = main(["eval", "zeroshot", "--model", str(eval_files["model"]), "--data", missing,
                 "--classes", str(eval_files["classes"]), *COMMON])  # fmt: skip
    assert code == 2 and "not found" in capsys.readouterr().err


def test_int8_evaluates_the_quantized_copy_and_caches_it_apart(eval_files, tmp_path):
    results = {}
    for flags in ([], ["--int8"]):
        out = tmp_path / f"r{len(flags)}.json"
        code = main(
            ["eval", "retrieval", "--model", str(eval_files["model"]), "--data", str(eval_files["eval"]),
             "--caption-key", "json:label", "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
             *flags, *COMMON]
        )  # fmt: skip
        assert code == 0
        results[bool(flags)] = json.loads(out.read_text())["metrics"]
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 4  # image and text features, fp32 and int8: neither reused the other's
    assert results[True].keys() == results[False].keys()
    # By value: a metric may change only through comparisons that int8 rounding can flip. Every score
    # moves by at most delta, so a wrong item can overtake the right one only if their fp32 scores are
    # within 2 * delta (plus float slack: the command batches differently). Those comparisons bound how
    # far each query's rank, hence each metric, can move; most metrics here must not move at all.
    delta, near = retrieval_near_ties(eval_files)
    assert delta < 0.06  # about 4 int8 products per tower, each rounding both operands to 1/254 of a peak
    for direction, counts in near.items():
        n, movable = len(counts), int((counts > 0).sum())
        for metric, fp32 in results[False].items():
            if not metric.startswith(direction):
                continue
            bound = {"mean_rank": counts.sum().item() / n, "median_rank": counts.max().item()}
            limit = bound.get(metric.split("_", 1)[1], movable / n)  # R@K: the share of movable queries
            assert abs(results[True][metric] - fp32) <= limit + 1e-9, (metric, delta)


def bad_shard(path, huge: tuple[int, int]):
    """Six labelled samples: 1 is a truncated JPEG, 2 a text file, 4 a PNG of `huge` pixels."""
    samples = labelled_samples(["red", "green", "blue"] * 2, start=200)
    samples[1]["png"], samples[2]["png"] = truncated_jpeg(), b"not an image"
    samples[4]["png"] = huge_png(*huge)
    return write_shard(path, samples)


def test_unusable_images_are_counted_by_reason_in_the_output_and_the_json(eval_files, tmp_path, capsys):
    shard = bad_shard(tmp_path / "bad.tar", (300, 300))
    common = [
        "--model",
        str(eval_files["model"]),
        "--data",
        str(shard),
        "--classes",
        str(eval_files["classes"]),
    ]
    for run in range(2):  # the second run finds the features in the cache
        out = tmp_path / f"zs{run}.json"
        flags = ["--max-image-pixels", "10000", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
        assert main(["eval", "zeroshot", *common, *flags, *COMMON]) == 0
        assert "3 images (3 skipped: 2 corrupt_image, 1 too_large)" in capsys.readouterr().out
        result = json.loads(out.read_text())
        assert result["n"] == 3 and result["skipped_by_reason"] == {"corrupt_image": 2, "too_large": 1}
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1  # the image features, made once
    assert main(["eval", "zeroshot", *common, "--max-image-pixels", "-1", *COMMON]) == 2
    assert "--max-image-pixels must be >= 0, got -1" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_suite_reports_unusable_images_per_task(eval_files, tmp_path, capsys):
    shard = bad_shard(tmp_path / "bad.tar", (9_000, 8_000))  # 72 MP: over the default limit
    files = {**eval_files, "eval": shard}
    suite = write_suite(tmp_path / "suite.toml", files, tmp_path / "out", tmp_path / "cache", probe=True)
    assert main(["eval", "suite", str(suite), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("3 images (3 skipped: 2 corrupt_image, 1 too_large)") == 3
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["skipped_by_reason"] for r in results] == [{"corrupt_image": 2, "too_large": 1}] * 3
    assert results[2]["train_skipped_by_reason"] == {} and results[2]["n_test"] == 3
