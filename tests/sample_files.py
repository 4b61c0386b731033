"""Files that tests build for themselves: tar shards (the one writer every test uses), a pictext-like
corpus, labelled coloured squares, images of every mode, and broken or huge images."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------------
# Tar files: the one writer every test uses
# ----------------------------------------------------------------------------------------------------

Member = bytes | str | dict | list | tarfile.TarInfo


def write_tar(
    path: Path,
    members: Mapping[str, Member] | Iterable[tuple[str, Member]],
    format: int = tarfile.DEFAULT_FORMAT,
    pax_headers: dict[str, str] | None = None,
) -> Path:
    """A tar of `members` in order: name -> bytes, str (UTF-8) or a dict/list (JSON). A `TarInfo` value is
    added as it is, without data (folders, links). `format` is one of tarfile's *_FORMAT constants;
    `pax_headers` go into a global header (pax format)."""
    items = members.items() if isinstance(members, Mapping) else members
    with tarfile.open(path, "w", format=format, pax_headers=pax_headers) as tar:
        for name, value in items:
            if isinstance(value, tarfile.TarInfo):
                tar.addfile(value)
                continue
            data = json.dumps(value).encode() if isinstance(value, dict | list) else value
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A webdataset shard: each sample maps an extension to its member (see `write_tar`), plus "__key__"."""
    members = [
        (f"{sample['__key__']}.{ext}", value)
        for sample in samples
        for ext, value in sample.items()
        if ext != "__key__"
    ]
    return write_tar(path, members)


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples, key -> {extension: bytes}, sorted by key: what `write_shard` wrote."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return dict(sorted(samples.items()))


def read_shards(paths: Iterable[Path]) -> dict[str, dict[str, bytes]]:
    """The samples of several shards, merged: `read_shard` over each."""
    return {key: sample for path in paths for key, sample in read_shard(path).items()}


# A pictext-like corpus: emoji in two styles, with skin-tone variants, one emoji outside the classes and
# one clip-art image, over two shards (the benchmarks that split pictext read this layout).
PICTEXT_CLASSES = [f"emoji {i}" for i in range(40)]


def _pictext_sample(key: str, caption: str = "a caption", **meta) -> dict:
    return {"__key__": key, "png": b"\x89PNG", "txt": caption.encode(), "json": json.dumps(meta).encode()}


def fake_pictext(root: Path) -> Path:
    samples = []
    for i, label in enumerate(PICTEXT_CLASSES):
        for style in ("google", "openmoji"):
            meta = {"source": "emoji", "style": style, "label": label}
            samples.append(_pictext_sample(f"emoji-{style}-{i}", f"{label}\n{style}", skin=None, **meta))
            samples.append(_pictext_sample(f"emoji-{style}-{i}-dark", label, skin=5, **meta))
    samples.append(
        _pictext_sample("emoji-openmoji-x", source="emoji", style="openmoji", label="not a class", skin=None)
    )
    samples.append(_pictext_sample("openclipart-1", "a tree", source="openclipart", path="a/b.png"))
    root.mkdir()
    write_shard(root / "train-000.tar", samples[: len(samples) // 2])
    write_shard(root / "train-001.tar", samples[len(samples) // 2 :])
    (root / "classes-emoji.json").write_text(json.dumps(PICTEXT_CLASSES))
    return root


# ----------------------------------------------------------------------------------------------------
# Labelled evaluation data
# ----------------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def random_image(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> Image.Image:
    """An image of `mode` and `size` with random pixels (and a random palette for P/PA)."""
    w, h = size
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode == "I;16":
        return Image.frombytes(mode, size, rng.integers(0, 65536, (h, w)).astype("<u2").tobytes())
    if mode == "I":
        return Image.frombytes(mode, size, rng.integers(-9, 300, (h, w)).astype("<i4").tobytes())
    if mode == "F":
        return Image.frombytes(mode, size, (rng.random((h, w)) * 300).astype("<f4").tobytes())
    bands = {"P": 1, "LA": 2, "PA": 2}.get(mode, len(mode))
    image = Image.frombytes(mode, size, rng.integers(0, 256, (h, w, bands), dtype=np.uint8).tobytes())
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


def random_images(count: int, seed: int = 1) -> list[Image.Image]:
    """`count` seeded images cycling through odd sizes and the modes a photo collection holds."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (30, 40), (1, 50), (64, 64), (13, 9), (90, 20)]
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
    return [random_image(rng, modes[i % len(modes)], sizes[i % len(sizes)]) for i in range(count)]


def colour_png(colour: str, size: int = 12, shade: int = 0) -> bytes:
    """A small PNG of one colour (a `shade` offset makes images of the same colour differ)."""
    r, g, b = COLOURS[colour]
    out = io.BytesIO()
    Image.new("RGB", (size, size), (r, max(0, g - shade), b)).save(out, format="PNG")
    return out.getvalue()


def labelled_samples(colours: list[str], start: int = 0) -> list[dict]:
    """Webdataset samples of coloured squares: a PNG, a JSON label and a caption each."""
    return [
        {
            "__key__": f"s{start + i:04d}",
            "png": colour_png(c, shade=i),
            "json": {"label": c},
            "txt": f"a {c} square",
        }
        for i, c in enumerate(colours)
    ]


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of `width` x `height` pixels, built without holding its pixels: a few KB
    even at 12,000 x 12,000 (the shape of a decompression bomb)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def truncated_jpeg(size: int = 24) -> bytes:
    """The first half of a JPEG: the header is whole, the image data cut off."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(out, format="JPEG")
    return out.getvalue()[: len(out.getvalue()) // 2]
