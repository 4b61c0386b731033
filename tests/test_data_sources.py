"""Each source reads its format, skips and counts bad samples, and rejects missing data up front."""

from __future__ import annotations

import io
import struct
from collections import Counter
from pathlib import Path

import pytest
import simplejpeg
import torch
from PIL import Image, ImageFile

from clipforge.data import SKIP_REASONS, DataConfig, TrainData, build_train_loader
from clipforge.data.samples import choose_caption
from clipforge.data.webdataset import count_samples, shuffle_buffer
from clipforge.transforms.loading import ImageTooLarge, decode_jpeg_rgb, load_image
from conftest import captions_of, stub_tokenizer
from sample_files import huge_png, write_tar

SIZE = 16  # model input side in these tests
CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    """A 24x20 picture whose red level encodes ``i`` (20 + 5i) and whose green is a gradient."""
    image = Image.new("RGB", (24, 20), (20 + 5 * i, 0, 90))
    image.putdata([(20 + 5 * i, 10 * x, 90) for _ in range(20) for x in range(24)])
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def build(cfg: DataConfig, seed: int = 0) -> TrainData:
    return build_train_loader(cfg, stub_tokenizer, SIZE, seed)


def collect(cfg: DataConfig, n: int, seed: int = 0, start: int = 0) -> list:
    stream = build(cfg, seed).batches(start)
    return [next(stream) for _ in range(n)]


def total_skipped(batches) -> Counter:
    total = Counter()
    for batch in batches:
        total.update(batch.skipped)
    return +total


# ----------------------------------------------------------------------------------------------------
# CSV / TSV
# ----------------------------------------------------------------------------------------------------


def write_table(folder: Path, name: str = "data.csv", sep: str = ",") -> Path:
    """Ten rows: six good, an empty caption, a corrupt image, a missing image file, an empty path."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(10):
        (folder / "img" / f"{i}.png").write_bytes(image_bytes(i))
        rows.append([f"img/{i}.png", f"sample {i}"])
    rows[3][1] = "  "
    (folder / "img" / "5.png").write_bytes(CORRUPT)
    rows[7][0] = "img/gone.png"
    rows[8][0] = ""
    lines = [sep.join(["filepath", "caption"])] + [sep.join(row) for row in rows]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_csv_rows_become_batches_and_bad_rows_are_counted(tmp_path, workers):
    path = write_table(tmp_path)
    cfg = DataConfig(source="csv", path=str(path), batch_size=10, workers=workers, context_length=16)
    batches = collect(cfg, 2)  # one batch per epoch: every row once in each
    for batch in batches:
        assert batch.images.shape == (6, 3, SIZE, SIZE) and batch.tokens.shape == (6, 16)
        assert sorted(captions_of(batch.tokens)) == [f"sample {i}" for i in (0, 1, 2, 4, 6, 9)]
        expected = {"missing_image": 2, "corrupt_image": 1, "missing_caption": 1, "unreadable_shard": 0}
        expected.update(too_large=0, unknown_label=0)
        assert batch.skipped == expected
    assert [b.epoch for b in batches] == [0, 1]
    assert set(batches[0].skipped) == set(SKIP_REASONS)


def test_tsv_separator_by_extension_and_paths_relative_to_the_file(tmp_path, monkeypatch):
    write_table(tmp_path / "set", "data.tsv", sep="\t")
    monkeypatch.chdir(tmp_path)  # the CSV's folder, not the working directory, anchors its paths
    batch = collect(DataConfig(source="csv", path="set/data.tsv", batch_size=10), 1)[0]
    assert len(batch) == 6
    # Image and caption stay paired: the red level encodes the sample number.
    red = batch.images[:, 0].mean(dim=(1, 2)) * 0.26862954 + 0.48145466
    numbers = [int(c.split()[1]) for c in captions_of(batch.tokens)]
    # A constant red level survives resizing up to rounding; 2 levels is under half the step of 5 between
    # samples, so a swapped image and caption cannot pass.
    assert torch.allclose(red * 255, torch.tensor([20.0 + 5 * i for i in numbers]), atol=2)


def test_csv_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        build(DataConfig(source="csv", path=str(tmp_path / "nope.csv")))
    path = write_table(tmp_path)
    cfg = DataConfig(source="csv", path=str(path), csv_caption_column="title")
    with pytest.raises(ValueError, match=r"'title'.*\['filepath', 'caption'\]"):
        build(cfg)
    moved = tmp_path / "elsewhere.csv"
    moved.write_text("filepath,caption\nimg/0.png,a\nimg/1.png,b\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.csv").write_text(moved.read_text())
    with pytest.raises(FileNotFoundError, match="none of the first 2 images"):
        build(DataConfig(source="csv", path=str(tmp_path / "sub" / "x.csv")))
    with pytest.raises(ValueError, match=r"fewer than data\.batch_size"):
        build(DataConfig(source="csv", path=str(path), batch_size=11))


# ----------------------------------------------------------------------------------------------------
# Folder
# ----------------------------------------------------------------------------------------------------


def test_folder_pairs_images_with_text_files_recursively(tmp_path):
    for i in range(8):
        folder = tmp_path / ("a" if i < 4 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(image_bytes(i))
        (folder / f"{i}.txt").write_text(f"sample {i}\n")
    (tmp_path / "a" / "1.txt").unlink()  # no caption file
    (tmp_path / "b" / "c" / "5.txt").write_text("")  # empty caption
    (tmp_path / "b" / "c" / "6.png").write_bytes(CORRUPT)
    (tmp_path / "b" / "notes.md").write_text("not an image")
    (tmp_path / "b" / "UPPER.JPG").write_bytes(image_bytes(9, "JPEG"))
    (tmp_path / "b" / "UPPER.txt").write_text("sample 9")
    batch = collect(DataConfig(source="folder", path=str(tmp_path), batch_size=9, workers=2), 1)[0]
    assert sorted(captions_of(batch.tokens)) == [f"sample {i}" for i in (0, 2, 3, 4, 7, 9)]
    assert batch.skipped["missing_caption"] == 2 and batch.skipped["corrupt_image"] == 1


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder not found.*missing"):
        build(DataConfig(source="folder", path=str(tmp_path / "missing")))
    (tmp_path / "only.txt").write_text("caption without image")
    with pytest.raises(ValueError, match=r"no images \(\*\.jpg"):
        build(DataConfig(source="folder", path=str(tmp_path)))


# ----------------------------------------------------------------------------------------------------
# Webdataset
# ----------------------------------------------------------------------------------------------------


def write_shards(folder: Path, shards: int = 3, per_shard: int = 8, bad: bool = False) -> str:
    """``shards`` tars of ``per_shard`` samples (img2dataset layout); ``bad``: shard 1 has 4 bad ones."""
    for s in range(shards):
        members = {}
        for k in range(per_shard):
            i = s * per_shard + k
            fmt = ("jpg", "JPEG") if k % 3 == 0 else ("png", "PNG")
            members[f"{i:06d}.{fmt[0]}"] = image_bytes(i, fmt[1])
            members[f"{i:06d}.txt"] = f"sample {i}".encode()
            members[f"{i:06d}.json"] = b'{"source": "test"}'
        if bad and s == 1:
            members[f"{s * per_shard:06d}.jpg"] = CORRUPT
            members[f"{s * per_shard + 1:06d}.txt"] = b" \n"
            del members[f"{s * per_shard + 2:06d}.txt"]
            del members[f"{s * per_shard + 4:06d}.png"]
        write_tar(folder / f"train-{s:03d}.tar", members)
    return str(folder / f"train-{{000..{shards - 1:03d}}}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_shards_and_counted_skips(tmp_path, workers):
    # Four shards, so that with two workers (two shard streams) each stream's epoch is two shards.
    spec = write_shards(tmp_path, shards=4, per_shard=6, bad=True)
    cfg = DataConfig(source="webdataset", path=spec, batch_size=4, workers=workers, shuffle_buffer=5)
    batches = collect(cfg, 8)
    first_epoch = [b for b in batches if b.epoch == 0]
    assert len(first_epoch) == 6  # 24 samples, none dropped: every shard holds whole batches
    seen = [c for b in first_epoch for c in captions_of(b.tokens)]
    assert sorted(seen) == sorted(f"sample {i}" for i in range(24) if i not in (6, 7, 8, 10))
    assert total_skipped(first_epoch) == {"corrupt_image": 1, "missing_caption": 2, "missing_image": 1}
    assert all(b.images.shape[1:] == (3, SIZE, SIZE) for b in batches)
    # Shuffled: not the order in the tars.
    assert seen != sorted(seen, key=lambda c: int(c.split()[1]))


def test_webdataset_unreadable_shard_is_counted_not_fatal(tmp_path):
    spec = write_shards(tmp_path, shards=3)
    (tmp_path / "train-001.tar").write_bytes(b"garbage, not a tar" * 100)
    cfg = DataConfig(source="webdataset", path=spec, batch_size=4, shuffle_buffer=0)
    batches = collect(cfg, 6)
    assert total_skipped(batches)["unreadable_shard"] >= 1
    assert all(len(b) == 4 for b in batches)


def test_webdataset_errors_name_the_missing_shard(tmp_path):
    spec = write_shards(tmp_path, shards=2)
    cfg = DataConfig(source="webdataset", path=spec.replace("001", "002"))
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shard\(s\) not found: .*train-002\.tar"):
        build(cfg)
    cfg = DataConfig(source="webdataset", path=str(tmp_path / "train-000.tar"), workers=2)
    with pytest.raises(ValueError, match=r"1 shard.*workers=2"):
        build(cfg)


def test_webdataset_counts_samples_of_local_shards(tmp_path):
    spec = write_shards(tmp_path, shards=2, per_shard=5)
    assert count_samples(str(tmp_path / "train-000.tar")) == 5
    data = build(DataConfig(source="webdataset", path=spec, batch_size=2))
    assert data.samples_per_epoch == 10 and data.batches_per_epoch is None


def test_shuffle_buffer_is_a_seeded_permutation():
    import random

    items = list(range(50))
    out = list(shuffle_buffer(items, 8, random.Random(0)))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_buffer(items, 8, random.Random(0)))
    assert list(shuffle_buffer(items, 0, random.Random(0))) == items


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "parquet"}, "data.source"),
        ({"source": "csv"}, "data.path = '': required for data.source = 'csv'"),
        ({"max_image_pixels": -1}, "data.max_image_pixels = -1"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"workers": -1}, "data.workers"),
        ({"crop_scale": (0.5, 1.5)}, "data.crop_scale"),
        ({"source": "csv", "path": "x.csv", "csv_separator": ";;"}, "data.csv_separator"),
        ({"synthetic_samples": 10, "batch_size": 20}, "data.synthetic_samples"),
        ({"image_extensions": " , "}, "data.image_extensions"),
        ({"captions": "first"}, "data.captions"),
    ],
)
def test_config_rejects_values_that_cannot_work(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields).validate()


def test_config_separator_defaults():
    assert DataConfig(source="csv", path="a.tsv").separator() == "\t"
    assert DataConfig(source="csv", path="a.csv").separator() == ","
    assert DataConfig(source="csv", path="a.csv", csv_separator="tab").separator() == "\t"
    assert DataConfig(source="csv", path="a.csv", csv_separator=";").separator() == ";"


def test_choose_caption_picks_one_line_per_key_reproducibly():
    text = "a red bus\n\n  a bus on a street \nbus"
    assert choose_caption(text, 1, "all") == text and choose_caption("one line", 1, "sample") == "one line"
    picked = [choose_caption(text, key, "sample") for key in range(60)]
    assert set(picked) == {"a red bus", "a bus on a street", "bus"}  # blank lines are never picked
    assert picked == [choose_caption(text, key, "sample") for key in range(60)]
    with pytest.raises(ValueError, match="caption choice"):
        choose_caption(text, 1, "first")


def test_caption_sampling_trains_on_one_caption_per_sample_and_epoch(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i))
        (tmp_path / f"{i}.txt").write_text("".join(f"picture {i} caption {c}\n" for c in range(3)))
    cfg = DataConfig(source="folder", path=str(tmp_path), batch_size=4, captions="sample")
    epochs = [sorted(captions_of(batch.tokens)) for batch in collect(cfg, 6)]  # 6 epochs of one batch
    for captions in epochs:
        assert [c.rsplit(" caption ", 1)[0] for c in captions] == [f"picture {i}" for i in range(4)]
    assert len({tuple(c) for c in epochs}) > 1  # other epochs, other captions
    assert epochs == [sorted(captions_of(batch.tokens)) for batch in collect(cfg, 6)]  # reproducible
    whole = collect(DataConfig(source="folder", path=str(tmp_path), batch_size=4), 1)[0]
    assert all(c.count("caption") == 3 for c in captions_of(whole.tokens))  # "all": the whole text


# ----------------------------------------------------------------------------------------------------
# Pixel limit: images whose header declares too many pixels are skipped, never decoded
# ----------------------------------------------------------------------------------------------------


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header (SOF0) is rewritten to declare `width` x `height`."""
    data = bytearray(image_bytes(0, "JPEG"))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The (width, height) of every image decoded (by PIL or libjpeg) in this process."""
    sizes: list[tuple[int, int]] = []
    pil_load = ImageFile.ImageFile.load

    def load(image):
        sizes.append(image.size)
        return pil_load(image)

    turbo_decode = simplejpeg.decode_jpeg

    def decode_jpeg(data, *args, **kwargs):
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        sizes.append((width, height))
        return turbo_decode(data, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", decode_jpeg)
    return sizes


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_over_the_default_pixel_limit_are_skipped_without_decoding(tmp_path, decoded_sizes):
    members = {f"{i:06d}.png": image_bytes(i) for i in range(6)}
    members |= {f"{i:06d}.txt": f"sample {i}" for i in range(6)}
    members["000002.png"] = huge_png(12_000, 12_000)  # 144 MP in 18 KB
    members["000004.png"] = jpeg_declaring(12_000, 12_000)  # a JPEG header saying 144 MP
    members["000004.jpg"] = members.pop("000004.png")
    write_tar(tmp_path / "big.tar", sorted(members.items()))
    cfg = DataConfig(source="webdataset", path=str(tmp_path / "big.tar"), batch_size=6, shuffle_buffer=0)
    batch = collect(cfg, 1)[0]
    assert batch.skipped["too_large"] == 2 and batch.skipped["corrupt_image"] == 0
    assert sorted(captions_of(batch.tokens)) == [f"sample {i}" for i in (0, 1, 3, 5)]
    assert decoded_sizes and all(w * h <= 24 * 20 for w, h in decoded_sizes)  # only the small ones


def test_the_pixel_limit_is_a_data_field_and_zero_lifts_it(tmp_path):
    (tmp_path / "img").mkdir()
    rows = ["filepath,caption"]
    for i in range(6):
        side = 40 if i % 2 else 20  # 1600 or 400 pixels
        Image.new("RGB", (side, side), (10 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,sample {i}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(source="csv", path=str(tmp_path / "data.csv"), batch_size=6, max_image_pixels=1000)
    batch = collect(cfg, 1)[0]
    assert batch.skipped["too_large"] == 3 and sorted(captions_of(batch.tokens)) == [
        "sample 0",
        "sample 2",
        "sample 4",
    ]
    cfg.max_image_pixels = 0
    assert sum(collect(cfg, 1)[0].skipped.values()) == 0
    cfg.max_image_pixels = 1600  # the limit itself is allowed
    assert sum(collect(cfg, 1)[0].skipped.values()) == 0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decoders_refuse_from_the_header(decoded_sizes):
    with pytest.raises(ImageTooLarge, match="12000 x 12000 = 144,000,000 pixels"):
        load_image(huge_png(12_000, 12_000))
    with pytest.raises(ImageTooLarge, match="over the limit of 64,000,000"):
        decode_jpeg_rgb(jpeg_declaring(12_000, 12_000), 16)
    with pytest.raises(ImageTooLarge, match="over the limit of 100"):
        load_image(image_bytes(0), max_pixels=100)
    # Over Pillow's own limit (179 MP), even with no limit of ours: still "too large", not "corrupt".
    with pytest.raises(ImageTooLarge):
        load_image(huge_png(20_000, 10_000), max_pixels=0)
    assert decoded_sizes == []
    assert load_image(image_bytes(0), max_pixels=480).size == (24, 20)
