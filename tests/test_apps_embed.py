"""clipforge embed: the vectors are the model's normalized embeddings; bad images are counted, never fatal;
a run killed mid-way and restarted, or split across ranks, ends with exactly the one-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.apps import embeddings as store
from clipforge.apps.embed import EmbedConfig, embed
from clipforge.cli import main
from sample_files import huge_png, random_images, truncated_jpeg, write_shard
from tolerances import rounding_budget, rounding_rtol

pytestmark = [
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),  # the bomb PNG
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, eval_files) -> dict[str, Path]:
    """A folder of 9 good images (3 captioned), 3 bad ones, and a shard of the same good images."""
    root = tmp_path_factory.mktemp("collection")
    folder = root / "images"
    folder.mkdir()
    good = {}
    for i, image in enumerate(random_images(9, seed=3)):
        path = folder / f"img{i}.{'jpg' if i % 2 else 'png'}"
        image.convert("RGB").save(path)
        good[path.name] = path.read_bytes()
        if i % 3 == 0:
            path.with_suffix(".txt").write_text(f"picture number {i}\n")
    (folder / "bad-truncated.jpg").write_bytes(truncated_jpeg())
    (folder / "bad-text.jpg").write_text("not an image at all")
    (folder / "bad-bomb.png").write_bytes(huge_png(12_000, 12_000))
    samples = [
        {"__key__": f"k{i}", name.rsplit(".", 1)[1]: data, "txt": f"caption {i}"}
        for i, (name, data) in enumerate(sorted(good.items()))
    ]
    samples.insert(4, {"__key__": "k-bad", "jpg": truncated_jpeg(), "txt": "broken"})
    samples.append({"__key__": "k-noimage", "txt": "a caption without an image"})
    write_shard(root / "shard.tar", samples)
    (root / "texts.txt").write_text("a red square\n\na blue circle\nthree green stars\n" * 3)
    return {
        "root": root,
        "folder": folder,
        "shard": root / "shard.tar",
        "texts": root / "texts.txt",
        **eval_files,
    }


def config(collection: dict[str, Path], out: Path, **kw) -> EmbedConfig:
    settings = {"part_size": 4, "batch_size": 3, "workers": 0, "dtype": "float32"}
    settings["images"] = "" if "texts" in kw else str(collection["folder"])
    return EmbedConfig(model=str(collection["model"]), out=str(out), **{**settings, **kw})


def reference_image_vectors(model_dir: Path, paths: list[Path]) -> torch.Tensor:
    """One image at a time through the plain (not inference-folded) model, then normalized."""
    model, preprocess, _ = clipforge.load(model_dir)
    with torch.no_grad():
        return torch.cat(
            [F.normalize(model.encode_image(preprocess(open_image(p))[None]), dim=-1) for p in paths]
        )


def open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def tolerance(model_dir: Path, tower: str) -> float:
    config = clipforge.load(model_dir)[0].config
    return rounding_rtol(torch.float32, *rounding_budget(config, tower))  # vectors are unit length


def test_image_vectors_are_the_normalized_embeddings_and_bad_images_are_counted(collection, tmp_path):
    result = embed(config(collection, tmp_path / "emb"), progress=False)
    vectors, table = store.read_embeddings(tmp_path / "emb")
    manifest = store.read_manifest(tmp_path / "emb")

    good = sorted(
        p for p in collection["folder"].iterdir() if p.name.startswith("img") and p.suffix != ".txt"
    )
    assert table.column("path").to_pylist() == [str(p) for p in good]
    expected = reference_image_vectors(collection["model"], good)
    assert np.abs(vectors - expected.numpy()).max() <= tolerance(collection["model"], "image")
    assert manifest["skipped"] == {"corrupt_image": 2, "too_large": 1}
    assert (result.count, result.parts_total, manifest["complete"]) == (9, 3, True)
    assert manifest["dim"] == 64 and manifest["model"] == str(collection["model"])
    captions = dict(zip(table.column("path").to_pylist(), table.column("caption").to_pylist(), strict=True))
    assert captions[str(good[0])] == "picture number 0" and captions[str(good[1])] == ""
    ids = table.column("id").to_pylist()  # listing order: bad-* sort first, so they hold ids 0..2
    assert ids == list(range(3, 12))


def test_float16_storage_rounds_the_float32_vectors(collection, tmp_path):
    embed(config(collection, tmp_path / "f32"), progress=False)
    embed(config(collection, tmp_path / "f16", dtype="float16"), progress=False)
    v32, _ = store.read_embeddings(tmp_path / "f32")
    v16, _ = store.read_embeddings(tmp_path / "f16")
    # Entries lie in [-1, 1]: float16 rounding moves each by at most half its spacing there, 2^-11.
    assert np.abs(v16 - v32).max() <= 2.0**-11
    assert np.array_equal(v16, v32.astype(np.float16).astype(np.float32))


def test_text_vectors_are_the_normalized_text_embeddings(collection, tmp_path):
    embed(config(collection, tmp_path / "t", texts=str(collection["texts"])), progress=False)
    vectors, table = store.read_embeddings(tmp_path / "t")
    texts = [line for line in collection["texts"].read_text().splitlines() if line]
    assert table.column("caption").to_pylist() == texts and table.column("id").to_pylist() == list(range(9))
    model, _, tokenizer = clipforge.load(collection["model"])
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    assert np.abs(vectors - expected.numpy()).max() <= tolerance(collection["model"], "text")


def test_shards_with_decode_workers_give_the_in_process_vectors(collection, tmp_path):
    embed(config(collection, tmp_path / "w0", images=str(collection["shard"])), progress=False)
    embed(config(collection, tmp_path / "w2", images=str(collection["shard"]), workers=2), progress=False)
    v0, t0 = store.read_embeddings(tmp_path / "w0")
    v2, t2 = store.read_embeddings(tmp_path / "w2")
    assert np.array_equal(v0, v2) and t0.equals(t2)
    assert t0.column("path").to_pylist() == [f"k{i}" for i in range(9)]
    assert t0.column("caption").to_pylist() == [f"caption {i}" for i in range(9)]
    assert set(t0.column("shard").to_pylist()) == {str(collection["shard"])}
    assert store.read_manifest(tmp_path / "w0")["skipped"] == {"corrupt_image": 1, "missing_image": 1}
    # The same images as files give the same vectors (shard members are read by offset, not re-encoded).
    embed(config(collection, tmp_path / "files"), progress=False)
    v_files, _ = store.read_embeddings(tmp_path / "files")
    assert np.abs(v0 - v_files).max() <= tolerance(collection["model"], "image")  # other batches


KILLER = """
import os, signal, sys
from clipforge.apps import embeddings as store
from clipforge.apps.embed import EmbedConfig, embed

calls = []
write_part = store.write_part

def dying_write(out_dir, name, table, summary):
    calls.append(name)
    if len(calls) == 2:  # half a temporary file, then killed
        (out_dir / f"{name}.tmp-{os.getpid()}").write_bytes(b"PAR1 half a part")
        os.kill(os.getpid(), signal.SIGKILL)
    write_part(out_dir, name, table, summary)

store.write_part = dying_write
embed(EmbedConfig(**__CONFIG__), progress=False)
"""


def kill_settings(collection: dict[str, Path]) -> dict:
    settings = {"model": str(collection["model"]), "images": str(collection["folder"]), "part_size": 3}
    return settings | {"batch_size": 2, "workers": 0, "dtype": "float32"}


def assert_resumes_to_the_whole_run(settings: dict, out: Path, whole: Path) -> None:
    embed(EmbedConfig(**settings, out=str(out)), progress=False)
    embed(EmbedConfig(**settings, out=str(whole)), progress=False)
    v_resumed, t_resumed = store.read_embeddings(out)
    v_whole, t_whole = store.read_embeddings(whole)
    assert t_resumed.equals(t_whole) and np.array_equal(v_resumed, v_whole)
    ids = t_resumed.column("id").to_pylist()
    assert ids == sorted(set(ids)) and len(ids) == 9  # no duplicates; every good image, so no gaps
    assert store.read_manifest(out) == store.read_manifest(whole)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_run_killed_while_writing_a_part_resumes_to_the_uninterrupted_result(collection, tmp_path):
    settings, out = kill_settings(collection), tmp_path / "killed"
    script = KILLER.replace("__CONFIG__", repr({**settings, "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == -9  # SIGKILL: nothing ran after it
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["parts"]) == ["part-00000.parquet"] and not manifest["complete"]
    assert [p.name.split("-")[-2] for p in out.glob("part-00001*")] == ["00001.parquet.tmp"]  # half-written
    assert_resumes_to_the_whole_run(settings, out, tmp_path / "whole")


def test_a_part_written_but_not_recorded_is_adopted_not_redone(collection, tmp_path, monkeypatch):
    settings, out = kill_settings(collection), tmp_path / "stopped"
    record, calls = store.record_part, []

    def failing_record(out_dir, name, summary):
        calls.append(name)
        if len(calls) == 2:  # a process stopped between the part's rename and the manifest update
            raise KeyboardInterrupt
        return record(out_dir, name, summary)

    monkeypatch.setattr(store, "record_part", failing_record)
    with pytest.raises(KeyboardInterrupt):
        embed(EmbedConfig(**settings, out=str(out)), progress=False)
    monkeypatch.undo()
    assert list(store.read_manifest(out)["parts"]) == ["part-00000.parquet"]
    adopted = (out / "part-00001.parquet").stat().st_mtime_ns
    assert_resumes_to_the_whole_run(settings, out, tmp_path / "whole")
    assert (out / "part-00001.parquet").stat().st_mtime_ns == adopted


def test_two_ranks_together_give_the_one_process_result(collection, tmp_path, monkeypatch):
    embed(config(collection, tmp_path / "one"), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        result = embed(config(collection, tmp_path / "two"), progress=False)
        assert result.parts_written == (2 if rank == "0" else 1)  # parts 0, 2 then part 1
    v1, t1 = store.read_embeddings(tmp_path / "one")
    v2, t2 = store.read_embeddings(tmp_path / "two")
    assert t1.equals(t2) and np.array_equal(v1, v2)
    assert store.read_manifest(tmp_path / "two")["complete"]


def test_a_different_run_in_the_same_directory_is_refused(collection, tmp_path):
    embed(config(collection, tmp_path / "emb"), progress=False)
    before = sorted(os.listdir(tmp_path / "emb"))
    with pytest.raises(ValueError, match=r"another run.*dtype 'float32' there, 'float16' now"):
        embed(config(collection, tmp_path / "emb", dtype="float16"), progress=False)
    assert sorted(os.listdir(tmp_path / "emb")) == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "float64"], "invalid choice"),
        (["--part-size", "0"], "--part-size must be >= 1"),
        (["--images", "/nonexistent/dir"], "not found"),
    ],
)
def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(collection, tmp_path, capsys, flags, message):
    argv = ["embed", "--model", str(collection["model"]), "--out", str(tmp_path / "out"), "--no-progress"]
    argv += flags if "--images" in flags else ["--images", str(collection["folder"]), *flags]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_embeds_and_reports(collection, tmp_path, capsys):
    argv = ["embed", "--model", str(collection["model"]), "--images", str(collection["shard"])]
    code = main(
        [*argv, "--out", str(tmp_path / "out"), "--workers", "0", "--no-progress", "--part-size", "5"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "3/3 parts, 9 vectors; skipped: 1 corrupt_image, 1 missing_image" in out
    assert store.read_manifest(tmp_path / "out")["dtype"] == "float16"
