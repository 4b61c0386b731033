"""Reading the files of a local tar shard, fast: ustar headers parsed directly, `tarfile` for the rest.

webdataset reads every shard through Python's `tarfile` in streaming mode, which costs ~50 us a member
(TarInfo parsing, field by field); with small images that was ~20% of a data worker's time
(docs/benchmarks.md). A plain ustar / GNU header is 512 bytes at fixed offsets, so for local files we
parse the few fields we need (name, size, type, checksum) in a few microseconds and read the data with
one `read` per member, streaming, in constant memory.

GNU long names and pax headers (their ``path`` and ``size``) are read too. Anything rarer -- global pax
headers, sparse files, base-256 sizes, pax names in another encoding -- hands the shard over to
`tarfile`, which resumes after the members already yielded: the result is the same either way.

Unlike `tarfile`, which ends an archive silently at a corrupt header, a bad checksum or a cut-off member
raises `tarfile.ReadError` naming the shard and the offset, so the caller can count the shard as
unreadable instead of losing its tail unnoticed.
"""

from __future__ import annotations

import itertools
import re
import tarfile
from collections.abc import Iterator

BLOCK = 512
_EMPTY = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_NOT_FILES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: skipped
_EXTENDED = (b"x", b"L", b"K")  # pax header, GNU long name, GNU long link: they describe the next member
# webdataset leaves out metadata files such as "__index__" (its default `skip_meta`); so do we.
_META = re.compile(r"__[^/]*__($|/)")


class _NeedsTarfile(Exception):
    """A header this reader does not parse; `tarfile` takes over."""


def tar_files(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in the local tar ``path``, in archive order.

    Raises `tarfile.ReadError` (after yielding every file before the damage) for a corrupt or cut-off
    archive.
    """
    yielded = 0
    try:
        for item in _ustar_files(path):
            yield item
            yielded += 1
    except _NeedsTarfile:
        yield from itertools.islice(_tarfile_files(path), yielded, None)


def _ustar_files(path: str) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as fh:
        offset = 0
        overrides: dict[str, str | int] = {}  # from extended headers, for the member that follows them
        while True:
            header = fh.read(BLOCK)
            if not header or header == _EMPTY:  # end of archive (end blocks, or a bare end of file)
                return
            if len(header) < BLOCK:
                raise tarfile.ReadError(f"{path}: truncated header at byte {offset}")
            name, size, kind = _parse_header(header, path, offset)
            if kind not in _EXTENDED:
                name, size = str(overrides.pop("path", name)), int(overrides.pop("size", size))
                overrides.clear()
            padded = -(-size // BLOCK) * BLOCK
            start, offset = offset, offset + BLOCK + padded
            if kind in _NOT_FILES or (kind == b"\0" and name.endswith("/")):
                fh.seek(padded, 1)
                continue
            data = fh.read(padded)
            if len(data) < size:
                raise tarfile.ReadError(f"{path}: {name!r} is cut off ({len(data)} of {size} bytes)")
            if kind in _EXTENDED:
                overrides.update(_extended_header(kind, data[:size], path, start))
            elif not _META.match(name):
                yield name, data[:size]


def _extended_header(kind: bytes, data: bytes, path: str, offset: int) -> dict[str, str | int]:
    """The name / size a GNU long-name or pax header sets for the next member."""
    if kind == b"L":
        return {"path": data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")}
    if kind == b"K":  # a long link target: links are not read
        return {}
    records: dict[bytes, bytes] = {}
    position = 0
    try:
        while position < len(data):  # records: b"<length> <key>=<value>\n", length counting it all
            space = data.index(b" ", position)
            end = position + int(data[position:space])
            key, _, value = data[space + 1 : end - 1].partition(b"=")
            records[key] = value
            position = end
    except ValueError:
        raise tarfile.ReadError(f"{path}: bad pax header at byte {offset}") from None
    if b"hdrcharset" in records:  # names in another encoding: tarfile knows what to do
        raise _NeedsTarfile("pax hdrcharset")
    found: dict[str, str | int] = {}
    if b"path" in records:
        found["path"] = records[b"path"].decode("utf-8", "surrogateescape")
    if b"size" in records:
        found["size"] = int(records[b"size"])
    return found


def _parse_header(header: bytes, path: str, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of one header block; raises for damage, _NeedsTarfile for the unusual."""
    if _octal(header[148:156], path, offset) != sum(header) - sum(header[148:156]) + 8 * 32:
        raise tarfile.ReadError(f"{path}: bad header checksum at byte {offset}")
    kind = header[156:157]
    if kind not in _REGULAR and kind not in _NOT_FILES and kind not in _EXTENDED:
        raise _NeedsTarfile(kind)
    if header[124] & 0x80:  # GNU base-256 size (files over 8 GiB)
        raise _NeedsTarfile("base-256 size")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0" and prefix:  # POSIX ustar: long paths split into prefix + name
        name = prefix + b"/" + name
    # tarfile's default decoding: UTF-8, undecodable bytes kept as surrogates
    return name.decode("utf-8", "surrogateescape"), _octal(header[124:136], path, offset), kind


def _octal(field: bytes, path: str, offset: int) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"{path}: invalid number {field!r} in the header at byte {offset}") from None


def _tarfile_files(path: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isreg() and not _META.match(member.name):
                yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]
