"""Determinism and exact resumption: batches(k) is batches(0) without its first k batches."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.data import DataConfig, build_train_loader
from conftest import captions_of, stub_tokenizer
from sample_files import write_tar

SIZE = 16


def image_bytes(i: int) -> bytes:
    """A textured 40x30 PNG (so different crops give different pixels), distinct for each ``i``."""
    image = Image.new("RGB", (40, 30))
    pixels = [((7 * x + 3 * i) % 256, 11 * y % 256, (x * y + i) % 256) for y in range(30) for x in range(40)]
    image.putdata(pixels)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def take(cfg: DataConfig, start: int, n: int, seed: int = 0) -> list:
    stream = build_train_loader(cfg, stub_tokenizer, SIZE, seed).batches(start)
    return [next(stream) for _ in range(n)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.index, x.epoch, x.skipped) == (y.index, y.epoch, y.skipped)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.images, y.images)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A CSV of 13 textured images (one corrupt), so an epoch is 3 batches of 4 (one row left out)."""
    folder = tmp_path_factory.mktemp("table")
    lines = ["filepath,caption"]
    for i in range(13):
        (folder / f"{i}.png").write_bytes(b"broken" if i == 6 else image_bytes(i))
        lines.append(f"{i}.png,sample {i}")
    (folder / "data.csv").write_text("\n".join(lines))
    return folder / "data.csv"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Four shards of 6 samples (one with an empty caption), as img2dataset writes them."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(4):
        members = {}
        for i in range(6 * s, 6 * s + 6):
            members[f"{i:04d}.png"] = image_bytes(i)
            members[f"{i:04d}.txt"] = b"" if i == 9 else f"sample {i}".encode()
        write_tar(folder / f"part-{s}.tar", members)
    return str(folder / "part-{0..3}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_csv_resumes_exactly_across_epochs(table, workers):
    cfg = DataConfig(source="csv", path=str(table), batch_size=4, workers=workers)
    full = take(cfg, 0, 11)
    assert [b.epoch for b in full] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert [b.index for b in full] == list(range(11))
    for k in (2, 4, 7):  # mid-epoch, just after a boundary, and later
        assert_same(take(cfg, k, 11 - k), full[k:])


def test_map_style_stream_does_not_depend_on_workers(table):
    cfg = DataConfig(source="csv", path=str(table), batch_size=4)
    assert_same(take(cfg, 0, 7), take(DataConfig(**{**cfg.__dict__, "workers": 2}), 0, 7))


def test_each_epoch_is_a_new_permutation_with_new_crops(table):
    cfg = DataConfig(source="csv", path=str(table), batch_size=4)
    batches = take(cfg, 0, 6)
    epochs = [[c for b in batches[3 * e : 3 * e + 3] for c in captions_of(b.tokens)] for e in (0, 1)]
    for seen in epochs:  # 12 of 13 rows per epoch, each once; the corrupt one counted when drawn
        assert len(seen) == len(set(seen)) >= 11
    assert epochs[0] != epochs[1]
    # The same picture gets a different random crop in another epoch (the key includes the epoch).
    first = {c: img for b in batches[:3] for c, img in zip(captions_of(b.tokens), b.images, strict=True)}
    second = {c: img for b in batches[3:] for c, img in zip(captions_of(b.tokens), b.images, strict=True)}
    common = sorted(set(first) & set(second))
    assert common and not any(torch.equal(first[c], second[c]) for c in common)
    # Another seed: another order.
    other = take(cfg, 0, 3, seed=1)
    assert [c for b in other for c in captions_of(b.tokens)] != epochs[0]


def test_corrupt_rows_are_counted_in_the_batch_that_drew_them(table):
    cfg = DataConfig(source="csv", path=str(table), batch_size=4)
    batches = take(cfg, 0, 9)
    for batch in batches:
        assert len(batch) + batch.skipped["corrupt_image"] == 4
    assert sum(b.skipped["corrupt_image"] for b in batches) >= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_resumes_exactly_across_epochs(shards, workers):
    cfg = DataConfig(source="webdataset", path=shards, batch_size=4, workers=workers, shuffle_buffer=5)
    full = take(cfg, 0, 14)
    assert [b.index for b in full] == list(range(14))
    assert max(b.epoch for b in full) >= 2  # 24 samples: 6 batches an epoch, the cut drops none
    assert sum(b.skipped["missing_caption"] for b in full) >= 2
    for k in (3, 8):
        assert_same(take(cfg, k, 14 - k), full[k:])


def test_webdataset_stream_is_reproducible_and_seeded(shards):
    cfg = DataConfig(source="webdataset", path=shards, batch_size=4, workers=2, shuffle_buffer=5)
    assert_same(take(cfg, 0, 6), take(cfg, 0, 6))
    a = [c for b in take(cfg, 0, 6) for c in captions_of(b.tokens)]
    b = [c for b in take(cfg, 0, 6, seed=1) for c in captions_of(b.tokens)]
    assert a != b and sorted(a) != a
