"""`clipforge eval ...` smoke tests: each subcommand prints a table and writes --json."""

import csv
import json

from clipforge.cli import main
from conftest import write_suite  # with conftest's `eval_files`: a saved tiny model and labelled shards

COMMON = ["--workers", "0", "--batch-size", "4", "--no-progress"]


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
    assert 1e-6 <= result["C"] <= 1e6 and f"{result['C']:.6g}" in result["sweep"]


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
    assert code == 2 and "not found" in capsys.readouterr().out


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
