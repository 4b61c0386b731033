"""Reading and writing webdataset shards sample by sample, for the benchmarks that split pictext."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path


def samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of a webdataset shard, in order."""
    key, members = None, {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, ext = member.name.split(".", 1)
            if stem != key and members:
                yield key, members
                members = {}
            key, members[ext] = stem, tar.extractfile(member).read()
    if members:
        yield key, members


def add(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Append one sample's files to an open tar."""
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
