"""clipforge search: the query is encoded by the index's model and the hits are the brute-force best;
the original image bytes come back for files and shard members; bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.apps import embeddings as store
from clipforge.apps.embed import EmbedConfig, embed
from clipforge.apps.index import SearchIndex, add_to_index, build_index
from clipforge.cli import main
from sample_files import random_images, write_shard
from tolerances import rounding_budget, rounding_rtol

pytest.importorskip("faiss")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, eval_files) -> dict[str, Path]:
    """An index over a folder of 6 images (embedded first) and a shard of 5 more (added)."""
    root = tmp_path_factory.mktemp("search")
    images = random_images(11, seed=7)
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(images[:6]):
        image.convert("RGB").save(folder / f"f{i}.png")
        (folder / f"f{i}.txt").write_text(f"folder picture {i}")
    samples = []
    for i, image in enumerate(images[6:]):
        path = root / f"s{i}.png"
        image.convert("RGB").save(path)
        samples.append({"__key__": f"s{i}", "png": path.read_bytes(), "txt": f"shard picture {i}"})
    write_shard(root / "shard.tar", samples)
    settings = {"model": str(eval_files["model"]), "dtype": "float32", "workers": 0, "part_size": 4}
    embed(EmbedConfig(images=str(folder), out=str(root / "emb-folder"), **settings), progress=False)
    embed(
        EmbedConfig(images=str(root / "shard.tar"), out=str(root / "emb-shard"), **settings), progress=False
    )
    build_index(root / "emb-folder", root / "index", log=lambda _: None)
    add_to_index(root / "index", root / "emb-shard", log=lambda _: None)
    return {"root": root, "folder": folder, "index": root / "index", "model": eval_files["model"]}


def all_vectors(indexed: dict[str, Path]) -> tuple[np.ndarray, list[str], list[str]]:
    """The indexed vectors, paths and captions, in index order (the folder's, then the shard's)."""
    parts = [store.read_embeddings(indexed["root"] / name) for name in ("emb-folder", "emb-shard")]
    paths = [p for _, t in parts for p in t.column("path").to_pylist()]
    return (
        np.concatenate([v for v, _ in parts]),
        paths,
        [c for _, t in parts for c in t.column("caption").to_pylist()],
    )


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["search", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_search_json_is_the_brute_force_ranking(indexed, capsys):
    code, out, err = run_cli(capsys, str(indexed["index"]), "--text", "a red square", "-k", "5", "--json")
    assert code == 0 and not err
    hits = json.loads(out)
    model, _, tokenizer = clipforge.load(indexed["model"])
    with torch.no_grad():
        query = F.normalize(model.encode_text(tokenizer(["a red square"])), dim=-1).numpy()[0]
    vectors, paths, captions = all_vectors(indexed)
    scores = vectors @ query
    best = np.argsort(-scores)[:5]
    assert [h["path"] for h in hits] == [paths[i] for i in best]
    # The CLI's query comes from the inference copy, this one from the plain model: the text tower's
    # rounding, then the 64-term dot products (faiss's and numpy's) of unit vectors.
    bound = rounding_rtol(torch.float32, *rounding_budget(model.config, "text")) + 2 * rounding_rtol(
        torch.float32, 1, 64
    )
    assert np.abs(np.array([h["score"] for h in hits]) - scores[best]).max() <= bound
    assert [(h["id"], h["caption"]) for h in hits] == [(i, captions[i]) for i in best]


def test_an_indexed_image_finds_itself_first(indexed, capsys):
    image = indexed["folder"] / "f3.png"
    code, out, _ = run_cli(capsys, str(indexed["index"]), "--image", str(image), "-k", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    score, path, caption = lines[0].split("  ")
    assert path == str(image) and caption == "folder picture 3"
    assert float(score) >= 1 - 1e-4  # the same vector up to rounding, printed to 4 decimals


def test_image_bytes_are_the_originals_for_files_and_shard_members(indexed):
    index = SearchIndex.open(indexed["index"])
    assert index.count == 11 and index.model == str(indexed["model"]) and index.dim == 64
    vectors, _, _ = all_vectors(indexed)
    by_path = {hit.path: hit for hit in index.search(vectors, 1) for hit in hit}
    assert (
        index.image_bytes(by_path[str(indexed["folder"] / "f2.png")])
        == (indexed["folder"] / "f2.png").read_bytes()
    )
    assert index.image_bytes(by_path["s4"]) == (indexed["root"] / "s4.png").read_bytes()
    assert by_path["s4"].id == 10  # the shard was added after the folder's 6: ids continue
    moved = indexed["folder"] / "f5.png"
    moved.rename(moved.with_suffix(".moved"))
    try:
        assert index.image_bytes(by_path[str(moved)]) is None
    finally:
        moved.with_suffix(".moved").rename(moved)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, eval_files) -> Path:
    """A model of another embedding size (128) with the same tokenizer."""
    tokenizer = clipforge.load(eval_files["model"])[2]
    torch.manual_seed(0)
    return clipforge.save(
        clipforge.create_model("ViT-Nano-16-64"), tmp_path_factory.mktemp("nano") / "m", tokenizer
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["INDEX_MISSING", "--text", "x"], "not a search index"),
        (["INDEX", "--text", "x", "--model", "OTHER"], "gives 128-d vectors; the index"),
        (["INDEX", "--image", "NOT_AN_IMAGE"], "not a usable image"),
        (["INDEX", "--image", "NO_FILE"], "no such file"),
        (["INDEX", "--text", "x", "-k", "0"], "-k must be >= 1"),
    ],
)
def test_errors_are_one_line_and_exit_2(indexed, other_model, capsys, tmp_path, args, message):
    (tmp_path / "notes.png").write_text("not a picture")
    names = {
        "INDEX": str(indexed["index"]),
        "INDEX_MISSING": str(tmp_path / "nothing"),
        "OTHER": str(other_model),
        "NOT_AN_IMAGE": str(tmp_path / "notes.png"),
        "NO_FILE": str(tmp_path / "gone.png"),
    }
    code, out, err = run_cli(capsys, *[names.get(a, a) for a in args])
    assert code == 2 and not out
    assert err.startswith("clipforge search: ") and message in err and err.count("\n") == 1
