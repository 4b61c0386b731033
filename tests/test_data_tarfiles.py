"""The fast tar reader gives exactly what `tarfile` gives, hands unusual headers to it, and reports damage."""

from __future__ import annotations

import shutil
import subprocess
import tarfile

import pytest

from clipforge.data import tarfiles
from clipforge.data.tarfiles import tar_files
from sample_files import write_tar

NAMES = [
    "000001.jpg",
    "000001.txt",
    "deep/" * 30 + "000002.jpg",  # 150+ characters: ustar prefix, GNU long name or pax path
    "café/ünïcode-名前.txt",
    "empty.txt",
    "__index__",  # webdataset's metadata convention: left out
    "000003.Json",
]


def write_names(path, fmt: int, names=NAMES) -> None:
    """A folder and a link (which readers leave out), then a file for each name, in tar format `fmt`."""
    folder = tarfile.TarInfo("a-folder/")
    folder.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("a-link")
    link.type, link.linkname = tarfile.SYMTYPE, NAMES[0]
    files = [
        (name, b"" if name == "empty.txt" else bytes(range(256)) * (i + 1) + name.encode())
        for i, name in enumerate(names)
    ]
    write_tar(path, [(folder.name, folder), (link.name, link), *files], format=fmt)


def reference(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and not m.name.startswith("__")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_files_as_tarfile_in_every_format(tmp_path, fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if n.isascii()]
    path = tmp_path / "shard.tar"
    write_names(path, fmt, names)
    got = list(tar_files(str(path)))
    assert got == reference(path)
    assert [n for n, _ in got] == [n for n in names if n != "__index__"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_pax_headers_are_read_without_tarfile(tmp_path, fmt, monkeypatch):
    path = tmp_path / "shard.tar"
    write_names(path, fmt)
    expected = reference(path)
    monkeypatch.setattr(tarfiles, "_tarfile_files", lambda path: pytest.fail("fell back to tarfile"))
    assert list(tar_files(str(path))) == expected


def test_a_global_pax_header_hands_over_to_tarfile(tmp_path):
    path = tmp_path / "shard.tar"
    members = {"a.jpg": b"abc", "a.txt": b"abc"}
    write_tar(path, members, format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"})
    assert list(tar_files(str(path))) == reference(path) == [("a.jpg", b"abc"), ("a.txt", b"abc")]


def test_a_bad_header_is_reported_after_the_good_files(tmp_path):
    path = tmp_path / "shard.tar"
    write_names(path, tarfile.USTAR_FORMAT, ["a.jpg", "a.txt", "b.jpg"])
    raw = bytearray(path.read_bytes())
    third = raw.index(b"b.jpg")  # the third file's header starts with its name
    raw[third + 100] ^= 0xFF  # damage its mode field: the checksum no longer matches
    path.write_bytes(bytes(raw))
    files = tar_files(str(path))
    assert [next(files)[0], next(files)[0]] == ["a.jpg", "a.txt"]
    with pytest.raises(tarfile.ReadError, match=rf"shard\.tar: bad header checksum at byte {third}"):
        next(files)


def test_a_cut_off_archive_is_an_error_not_a_silent_end(tmp_path):
    path = tmp_path / "shard.tar"
    write_names(path, tarfile.USTAR_FORMAT, ["a.jpg", "b.jpg"])
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(b"b.jpg") + 512 + 100])  # b.jpg's header and 100 of its bytes
    with pytest.raises(tarfile.ReadError, match=r"'b\.jpg' is cut off"):
        list(tar_files(str(path)))


def test_not_a_tar(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"garbage, not a tar" * 100)
    with pytest.raises(tarfile.ReadError, match=r"shard\.tar"):
        list(tar_files(str(path)))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs the tar command")
@pytest.mark.parametrize("fmt", ["posix", "gnu", "ustar"])
def test_archives_written_by_the_tar_command(tmp_path, fmt, monkeypatch):
    """GNU tar's posix format puts a pax header before every member; all three read without tarfile."""
    folder = tmp_path / "shard"
    folder.mkdir()
    (folder / "000001.jpg").write_bytes(bytes(range(256)) * 3)
    (folder / "000001.txt").write_text("a caption")
    path = tmp_path / "shard.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(path), "-C", str(tmp_path), "shard"], check=True)
    expected = reference(path)
    monkeypatch.setattr(tarfiles, "_tarfile_files", lambda path: pytest.fail("fell back to tarfile"))
    assert list(tar_files(str(path))) == expected and len(expected) == 2
