"""clipforge.data.webdataset: a sample never spans two shards, whichever webdataset release reads them."""

from __future__ import annotations

from collections import Counter

import pytest

from clipforge.data.webdataset import ShardSource
from sample_files import write_shard


@pytest.mark.parametrize("opener", ["local", "pipe"])
def test_equal_keys_in_two_shards_are_two_samples(tmp_path, opener):
    # The second shard starts with the key the first one ends with (000002): that sample must not be
    # merged into the first shard's last one, for our local reader and webdataset's opener (pipe:) alike.
    paths = [
        write_shard(
            tmp_path / f"s{s}.tar",
            [
                {"__key__": f"{k:06d}", "jpg": b"x", "txt": f"{s}/{k}"}
                for k in (range(3) if s == 0 else (2, 1, 0))
            ],
        )
        for s in range(2)
    ]
    spec = "::".join(str(p) if opener == "local" else f"pipe:cat {p}" for p in paths)
    errors: Counter[str] = Counter()
    source = ShardSource(spec, ("jpg",), "txt", shuffle_buffer=0, seed=0)
    samples = list(source.epoch_samples(0, stream=0, streams=1, errors=errors))
    assert not errors
    assert sorted((s.caption, s.key) for s in samples) == sorted(
        (f"{s}/{k}".encode(), f"s{s}.tar/{k:06d}") for s in range(2) for k in range(3)
    )


def test_streams_of_an_epoch_read_every_shard_once(tmp_path):
    # 7 shards over 3 streams: stream 0 reads 3 shards, streams 1 and 2 read 2; each epoch reshuffles.
    spec = "::".join(
        str(
            write_shard(
                tmp_path / f"s{s}.tar", [{"__key__": f"{k:06d}", "jpg": b"x", "txt": "c"} for k in range(2)]
            )
        )
        for s in range(7)
    )
    source = ShardSource(spec, ("jpg",), "txt", shuffle_buffer=0, seed=0)
    owners = []
    for epoch in (0, 1):
        shards = [
            {s.key.split("/")[0] for s in source.epoch_samples(epoch, i, 3, Counter())} for i in range(3)
        ]
        assert sorted(len(mine) for mine in shards) == [2, 2, 3]
        assert set.union(*shards) == {f"s{s}.tar" for s in range(7)}  # disjoint, since the sizes add up to 7
        owners.append(shards)
    assert owners[0] != owners[1]
