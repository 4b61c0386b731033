"""data.batch_size is the global batch: N processes' batches joined are the one-process batch.

Every source, any number of processes (1, 2, 4) and DataLoader workers (0, 1, 2), from the start and
resumed: the same samples with the same augmentation. Webdataset: each shard read by one worker of one
process per epoch, and no process decodes another's samples. Resampled shard streams. Bad layouts.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge.data.webdataset as webdataset
from clipforge.data import DataConfig, build_train_loader
from clipforge.data.pipeline import Batch, BatchMaker, BatchStream
from clipforge.data.streams import rank_streams, split, worker_streams
from conftest import captions_of, stub_tokenizer
from sample_files import random_image, write_tar

SIZE = 16
WORLDS = (1, 2, 4)


def picture(i: int) -> tuple[str, bytes]:
    """(suffix, bytes) of a seeded 40x30 picture of random pixels: JPEG for even ``i``, PNG for odd."""
    image = random_image(np.random.default_rng(i), "RGB", (40, 30))
    fmt, suffix = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
    out = io.BytesIO()
    image.save(out, fmt)
    return suffix, out.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, bad: bool = False) -> str:
    """``shards`` tars of ``per_shard`` samples captioned "sample i"; ``bad``: sample 4 is corrupt and
    sample 9 has an empty caption."""
    for s in range(shards):
        members = {}
        for i in range(s * per_shard, (s + 1) * per_shard):
            suffix, data = picture(i)
            members[f"{i:04d}.{suffix}"] = b"not an image" if bad and i == 4 else data
            members[f"{i:04d}.txt"] = b" " if bad and i == 9 else f"sample {i}".encode()
        write_tar(folder / f"part-{s:02d}.tar", members)
    return str(folder / f"part-{{00..{shards - 1:02d}}}.tar")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A CSV of 20 JPEG/PNG pictures, one corrupt: an epoch is 2 batches of 8 (4 rows left out)."""
    folder = tmp_path_factory.mktemp("table")
    lines = ["filepath,caption"]
    for i in range(20):
        suffix, data = picture(i)
        (folder / f"{i}.{suffix}").write_bytes(b"broken" if i == 5 else data)
        lines.append(f"{i}.{suffix},sample {i}")
    (folder / "data.csv").write_text("\n".join(lines))
    return folder / "data.csv"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """16 shards of 3 samples, two of them bad."""
    return write_shards(tmp_path_factory.mktemp("shards"), shards=16, per_shard=3, bad=True)


def take(cfg: DataConfig, start: int, n: int, rank: int = 0, world_size: int = 1) -> list[Batch]:
    stream = build_train_loader(cfg, stub_tokenizer, SIZE, 0, rank, world_size).batches(start)
    return [next(stream) for _ in range(n)]


def joined(cfg: DataConfig, start: int, n: int, world_size: int) -> list[Batch]:
    """Batches ``start ... start + n - 1`` of each of ``world_size`` processes, joined rank by rank."""
    per_rank = [take(cfg, start, n, rank, world_size) for rank in range(world_size)]
    for batches in per_rank:
        assert [b.index for b in batches] == list(range(start, start + n))
    return [Batch.join(parts) for parts in zip(*per_rank, strict=True)]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.index, x.epoch, x.skipped) == (y.index, y.epoch, y.skipped)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.images, y.images)


def with_(cfg: DataConfig, **fields) -> DataConfig:
    return DataConfig(**{**cfg.__dict__, **fields})


# ----------------------------------------------------------------------------------------------------
# Any number of processes and workers: the one-process batches
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_map_style_ranks_join_into_the_one_process_batches(table, workers):
    cfg = DataConfig(source="csv", path=str(table), batch_size=8, crop_scale=(0.3, 1.0))
    reference = take(cfg, 0, 5)  # epochs 0, 0, 1, 1, 2
    assert sum(b.skipped["corrupt_image"] for b in reference) >= 1
    cfg = with_(cfg, workers=workers)
    for world_size in WORLDS:
        assert_same(joined(cfg, 0, 5, world_size), reference)
        assert_same(joined(cfg, 3, 2, world_size), reference[3:])  # resumed mid-epoch


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_shard_streams_ranks_join_into_the_one_process_batches(shards, workers):
    # 12 samples over 8 streams: chunks of 1 and 2 samples alternate, 3 per process with 4 processes.
    cfg = DataConfig(
        source="webdataset",
        path=shards,
        batch_size=12,
        shard_streams=8,
        shuffle_buffer=4,
        crop_scale=(0.3, 1.0),
    )
    reference = take(cfg, 0, 8)
    assert max(b.epoch for b in reference) >= 1
    assert sum(sum(b.skipped.values()) for b in reference) >= 2
    cfg = with_(cfg, workers=workers)
    for world_size in WORLDS:
        assert_same(joined(cfg, 0, 8, world_size), reference)
        assert_same(joined(cfg, 5, 3, world_size), reference[5:])  # resumed across an epoch boundary


def test_default_shard_streams_keep_one_process_one_worker_stream(shards):
    # data.shard_streams = 0: one stream per worker of every process; with one process and no worker
    # that is one stream over all shards, and a batch is B consecutive samples of it.
    cfg = DataConfig(source="webdataset", path=shards, batch_size=12, shuffle_buffer=0)
    batches = take(cfg, 0, 4)
    assert_same(batches, take(with_(cfg, shard_streams=1), 0, 4))
    seen = [c for b in batches for c in captions_of(b.tokens)]
    assert len(seen) == len(set(seen)) == 48 - 2  # one epoch, each sample once, the two bad ones counted
    assert sum(sum(b.skipped.values()) for b in batches) == 2


# ----------------------------------------------------------------------------------------------------
# Who reads and decodes what
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("streams", "batch_size"), [(8, 12), (8, 16), (12, 36), (4, 4), (16, 20)])
def test_a_process_streams_fill_exactly_its_slice_of_the_batch(streams, batch_size):
    for world_size in (w for w in WORLDS if streams % w == 0 and batch_size % w == 0):
        for rank in range(world_size):
            mine = rank_streams(rank, world_size, streams)
            positions = [p for s in mine for p in split(s, streams, batch_size)]
            start = rank * batch_size // world_size
            assert positions == list(range(start, start + batch_size // world_size))
            for workers in range(1, len(mine) + 1):  # the workers share the streams, in order
                shared = [
                    s for w in range(workers) for s in worker_streams(rank, world_size, streams, w, workers)
                ]
                assert shared == list(mine)
                assert all(worker_streams(rank, world_size, streams, w, workers) for w in range(workers))


def test_each_shard_is_read_by_one_worker_and_samples_decoded_by_their_process(tmp_path, monkeypatch):
    spec = write_shards(tmp_path, shards=16, per_shard=3)
    # 8 streams of 2 shards: every stream's epoch is 6 samples = 3 chunks of 2, so batches 0-2 are epoch 0.
    cfg = DataConfig(source="webdataset", path=spec, batch_size=16, shard_streams=8, shuffle_buffer=4)
    epoch = take(cfg, 0, 3)
    assert sorted(c for b in epoch for c in captions_of(b.tokens)) == sorted(f"sample {i}" for i in range(48))

    opened: Counter[str] = Counter()
    decoded: list[str] = []
    reader, decode = webdataset.tar_files, BatchMaker.decode

    def counted_reader(path: str):
        opened[path] += 1
        return reader(path)

    def counted_decode(self, raw, key):
        decoded.append(raw.key)
        return decode(self, raw, key)

    monkeypatch.setattr(webdataset, "tar_files", counted_reader)
    monkeypatch.setattr(BatchMaker, "decode", counted_decode)
    for world_size in WORLDS:
        for workers in (1, 2):
            opened.clear()
            for start in (0, 1):  # from the start, and resumed: skipped chunks are read, not decoded
                for rank in range(world_size):
                    data = build_train_loader(
                        with_(cfg, workers=workers), stub_tokenizer, SIZE, 0, rank, world_size
                    )
                    decoded.clear()
                    parts = []
                    for worker in range(workers):  # as the DataLoader's workers would, in turn
                        stream = BatchStream(data, start).worker_batches(worker, workers)
                        parts.append([next(stream) for _ in range(start, 3)])
                    # This process decoded its slice of the one-process batches and nothing else.
                    lo, hi = rank * 16 // world_size, (rank + 1) * 16 // world_size
                    mine = [c for b in epoch[start:] for c in captions_of(b.tokens)[lo:hi]]
                    assert sorted(f"sample {int(key[-4:])}" for key in decoded) == sorted(mine)
                    made = [Batch.join(p) for p in zip(*parts, strict=True)]
                    assert [c for b in made for c in captions_of(b.tokens)] == mine
            # Over all processes and workers, every shard once per run of an epoch.
            assert len(opened) == 16 and set(opened.values()) == {2}, (world_size, workers)


# ----------------------------------------------------------------------------------------------------
# Resampled streams
# ----------------------------------------------------------------------------------------------------


def test_resampled_streams_draw_with_replacement_and_resume(tmp_path):
    spec = write_shards(tmp_path, shards=6, per_shard=3)
    cfg = DataConfig(
        source="webdataset", path=spec, batch_size=8, shard_streams=4, resampled=True, shuffle_buffer=3,
        crop_scale=(0.3, 1.0),
    )  # fmt: skip
    reference = take(cfg, 0, 9)
    assert_same(reference, take(cfg, 0, 9))  # deterministic
    assert_same(take(cfg, 4, 5), reference[4:])  # resumable
    assert all(b.epoch == 0 and len(b) == 8 for b in reference)
    for world_size in (2, 4):
        assert_same(joined(with_(cfg, workers=1), 4, 5, world_size), reference[4:])
    # With replacement: within as many draws as shards, a stream draws some shard twice.
    source = build_train_loader(cfg, stub_tokenizer, SIZE, 0).source
    draws = [[source.resampled_shard(s, n) for n in range(6)] for s in range(4)]
    assert any(len(set(d)) < 6 for d in draws)
    # 72 samples drawn from 18: a sample drawn again gets another crop (its key names the draw).
    images: dict[str, list[torch.Tensor]] = {}
    for batch in reference:
        for caption, image in zip(captions_of(batch.tokens), batch.images, strict=True):
            images.setdefault(caption, []).append(image)
    again = [seen for seen in images.values() if len(seen) > 1]
    assert again and not any(torch.equal(a, b) for seen in again for a in seen for b in seen if a is not b)
    # More streams than shards is fine when they draw with replacement.
    assert len(take(with_(cfg, path=spec.replace("05", "01"), shard_streams=8), 0, 1)[0]) == 8


# ----------------------------------------------------------------------------------------------------
# Layouts that cannot work
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "world_size", "message"),
    [
        ({"batch_size": 10}, 4, r"data\.batch_size = 10: not divisible by the world size 4"),
        ({"shard_streams": 6}, 4, r"data\.shard_streams = 6: 6 streams, not a multiple of the world size 4"),
        ({"shard_streams": 4, "workers": 3}, 2, r"data\.shard_streams = 4: .*fewer than data\.workers = 3"),
        ({"shard_streams": 16}, 1, r"data\.shard_streams = 16: .*more than data\.batch_size = 8"),
        (
            {"workers": 3},
            4,
            r"data\.shard_streams = 0: 12 streams \(0 = one per worker.*more than data\.batch",
        ),
        ({"shard_streams": -1}, 1, r"data\.shard_streams = -1"),
    ],
)
def test_bad_layouts_are_refused_naming_the_field(shards, fields, world_size, message):
    cfg = DataConfig(**{"source": "webdataset", "path": shards, "batch_size": 8, **fields})
    with pytest.raises(ValueError, match=message):
        build_train_loader(cfg, stub_tokenizer, SIZE, 0, 0, world_size)


def test_more_streams_than_shards_or_a_bad_rank_is_refused(tmp_path, table):
    spec = write_shards(tmp_path, shards=4, per_shard=3)
    cfg = DataConfig(source="webdataset", path=spec, batch_size=8, shard_streams=8)
    with pytest.raises(
        ValueError, match=r"4 shard\(s\), fewer than its 8 shard streams \(data\.shard_streams=8"
    ):
        take(cfg, 0, 1)
    cfg = with_(cfg, path=spec.replace("03", "02"), shard_streams=0, workers=2)
    with pytest.raises(
        ValueError, match=r"3 shard\(s\), fewer than its 4 .*\(world size 2 x data\.workers=2"
    ):
        take(cfg, 0, 1, 1, 2)
    cfg = DataConfig(source="csv", path=str(table), batch_size=8)
    for rank, world_size in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="rank must be"):
            take(cfg, 0, 1, rank, world_size)
    with pytest.raises(ValueError, match="world size must be"):
        take(cfg, 0, 1, 0, 0)


def test_a_stream_shorter_than_its_chunk_is_an_error(tmp_path):
    spec = write_shards(tmp_path, shards=2, per_shard=3)  # 2 streams of 3 samples; chunks of 4
    with pytest.raises(RuntimeError, match=r"shard stream 0 of 2 found 3 samples .* fewer than its 4"):
        take(DataConfig(source="webdataset", path=spec, batch_size=8, shard_streams=2), 0, 1)
