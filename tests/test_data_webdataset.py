"""clipforge.data.webdataset: a sample never spans two shards, whichever webdataset release reads them."""

from __future__ import annotations

from collections import Counter

import pytest

from clipforge.data.webdataset import ShardSource
from conftest import write_shard


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
