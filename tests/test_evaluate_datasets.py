"""Evaluation data readers: tar shards, class folders, caption folders and CSV files, made in tmp_path
(with conftest's `write_shard`, `labelled_samples` and `colour_png`)."""

import gzip
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.evaluate.datasets import DataSpec, drop_undecodable, read_captioned, read_labelled
from clipforge.evaluate.features import image_features
from clipforge.evaluate.images import ImageDataset
from clipforge.models import create_model
from clipforge.transforms import EvalTransform
from sample_files import colour_png, huge_png, labelled_samples, truncated_jpeg, write_shard


def test_shard_labels_map_to_class_indices_and_unknown_or_imageless_samples_are_skipped(tmp_path):
    samples = labelled_samples(["red", "green", "blue", "red"])
    samples.append(
        {"__key__": "s0100", "png": colour_png("red"), "json": {"label": "purple"}}
    )  # no such class
    samples.append({"__key__": "s0101", "json": {"label": "red"}})  # no image
    write_shard(tmp_path / "eval.tar", samples)
    data = read_labelled(DataSpec(str(tmp_path / "eval.tar")), ["blue", "green", "red"])
    assert data.labels == [2, 1, 0, 2] and data.skipped == 2 and len(data) == 4
    assert data.skipped_by_reason == {"unknown_label": 1, "missing_image": 1}
    assert data.keys == ["s0000", "s0001", "s0002", "s0003"]
    transform = EvalTransform(16)
    decoded, ok = ImageDataset(data.images, transform)[1]
    expected = transform(Image.open(io.BytesIO(samples[1]["png"])))
    assert ok and torch.equal(decoded, expected)


def test_shard_labels_from_cls_members_and_classes_from_the_labels_found(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": colour_png("red"), "cls": str(i % 3)} for i in range(5)]
    write_shard(tmp_path / "eval.tar", samples)
    data = read_labelled(DataSpec(str(tmp_path / "eval.tar"), label_key="cls"))
    assert data.labels == [0, 1, 2, 0, 1] and data.classnames == ["0", "1", "2"]
    strings = read_labelled(DataSpec(str(write_shard(tmp_path / "b.tar", labelled_samples(["red", "blue"])))))
    assert strings.classnames == ["blue", "red"] and strings.labels == [1, 0]


def test_brace_patterns_read_shards_in_order_and_max_samples_stops_early(tmp_path):
    write_shard(tmp_path / "part-0.tar", labelled_samples(["red", "green"], start=0))
    write_shard(tmp_path / "part-1.tar", labelled_samples(["blue", "red"], start=2))
    spec = DataSpec(str(tmp_path / "part-{0..1}.tar"))
    assert read_labelled(spec, ["red", "green", "blue"]).labels == [0, 1, 2, 0]
    limited = DataSpec(str(tmp_path / "part-{0..1}.tar"), max_samples=3)
    assert read_labelled(limited, ["red", "green", "blue"]).keys == ["s0000", "s0001", "s0002"]


def test_shard_captions_from_txt_lines_or_a_json_field(tmp_path):
    samples = [
        {
            "__key__": "a",
            "png": colour_png("red"),
            "txt": "a red square\n\nred thing\n",
            "json": {"alt": ["x", "y"]},
        },
        {"__key__": "b", "png": colour_png("blue"), "txt": "", "json": {"alt": "blue"}},
    ]
    write_shard(tmp_path / "caps.tar", samples)
    data = read_captioned(DataSpec(str(tmp_path / "caps.tar")))
    assert data.captions == [["a red square", "red thing"]] and data.skipped == 1
    from_json = read_captioned(DataSpec(str(tmp_path / "caps.tar"), caption_key="json:alt"))
    assert from_json.captions == [["x", "y"], ["blue"]]


def test_compressed_tars_are_refused_with_a_clear_message(tmp_path):
    plain = write_shard(tmp_path / "eval.tar", labelled_samples(["red"]))
    (tmp_path / "eval.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(ValueError, match="uncompressed"):
        read_labelled(DataSpec(str(tmp_path / "eval.tar.gz"), format="webdataset"))


def write_class_folders(root: Path, folders: dict[str, list[str]]) -> Path:
    for folder, colours in folders.items():
        (root / folder / "sub").mkdir(parents=True)
        for i, colour in enumerate(colours):
            (root / folder / ("sub" if i % 2 else "") / f"{i}.png").write_bytes(colour_png(colour, shade=i))
    return root


def test_class_folders_name_the_classes(tmp_path):
    root = write_class_folders(tmp_path / "set", {"red": ["red", "red"], "blue": ["blue"]})
    data = read_labelled(DataSpec(str(root)))
    assert data.classnames == ["blue", "red"] and data.labels == [0, 1, 1]
    assert read_labelled(DataSpec(str(root)), ["red", "green", "blue"]).labels == [2, 0, 0]


def test_id_named_folders_map_to_classes_in_sorted_order(tmp_path):
    # ImageNet's layout: folders named n01440764, ... and a class file in the same (sorted id) order.
    root = write_class_folders(tmp_path / "val", {"n002": ["green"], "n001": ["red"], "n003": ["blue"]})
    data = read_labelled(DataSpec(str(root)), ["red", "green", "blue"])
    assert data.labels == [0, 1, 2]


def test_caption_folders_pair_images_with_same_name_text_files(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(colour_png("red"))
    (tmp_path / "pics" / "a.txt").write_text("red one\nscarlet one\n")
    (tmp_path / "pics" / "b.png").write_bytes(colour_png("blue"))  # no caption: skipped
    data = read_captioned(DataSpec(str(tmp_path / "pics")))
    assert data.captions == [["red one", "scarlet one"]] and data.skipped == 1


def test_csv_labels_by_name_or_index_and_captions_grouped_by_image(tmp_path):
    for name in ("r.png", "g.png"):
        (tmp_path / name).write_bytes(colour_png("red" if name == "r.png" else "green"))
    (tmp_path / "labels.csv").write_text("filepath,label\nr.png,red\ng.png,1\nr.png,mauve\n")
    data = read_labelled(DataSpec(str(tmp_path / "labels.csv")), ["red", "green"])
    assert data.labels == [0, 1] and data.skipped == 1 and Path(data.images[0].path).name == "r.png"
    (tmp_path / "caps.tsv").write_text("filepath\ttitle\nr.png\tred\ng.png\tgreen\nr.png\tcrimson\n")
    caps = read_captioned(DataSpec(str(tmp_path / "caps.tsv"), caption_key="title"))
    assert caps.captions == [["red", "crimson"], ["green"]]
    with pytest.raises(ValueError, match="no column"):
        read_captioned(DataSpec(str(tmp_path / "caps.tsv"), caption_key="caption"))


# ----------------------------------------------------------------------------------------------------
# Images that cannot be used: left out of features and data alike, counted by reason
# ----------------------------------------------------------------------------------------------------


def with_bad_images(samples: list[dict]) -> list[dict]:
    """Samples 1 and 3 get a truncated JPEG and a text file named .jpg, sample 4 a 144 MP PNG."""
    for i, image in ((1, truncated_jpeg()), (3, b"this is not an image\n")):
        del samples[i]["png"]
        samples[i]["jpg"] = image
    samples[4]["png"] = huge_png(12_000, 12_000)
    return samples


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_undecodable_shard_images_are_left_out_and_counted_and_the_rest_stay_aligned(tmp_path):
    torch.manual_seed(0)
    model = create_model("ViT-Micro-16-32").eval()
    colours = ["red", "green", "blue", "red", "green", "blue"]
    write_shard(tmp_path / "bad.tar", with_bad_images(labelled_samples(colours)))
    data = read_labelled(DataSpec(str(tmp_path / "bad.tar")), ["red", "green", "blue"])
    assert len(data) == 6  # reading looks at no pixel
    features = image_features(model, data.images, batch_size=2, workers=2)
    assert torch.isnan(features).all(dim=1).tolist() == [False, True, False, True, True, False]
    kept = drop_undecodable(data, features, EvalTransform(32))
    assert data.skipped_by_reason == {"corrupt_image": 2, "too_large": 1} and data.skipped == 3
    assert data.keys == ["s0000", "s0002", "s0005"] and data.labels == [0, 2, 2]
    good = [labelled_samples(colours)[i] for i in (0, 2, 5)]
    clean = read_labelled(DataSpec(str(write_shard(tmp_path / "good.tar", good))), ["red", "green", "blue"])
    expected = image_features(model, clean.images, batch_size=2, workers=0)
    # Other batch compositions: equal up to float32 summation order over widths of at most 256.
    torch.testing.assert_close(kept, expected, rtol=1e-4, atol=1e-5)


def test_undecodable_folder_images_are_left_out_and_counted(tmp_path):
    torch.manual_seed(0)
    model = create_model("ViT-Micro-16-32").eval()
    root = write_class_folders(tmp_path / "set", {"red": ["red", "red"], "blue": ["blue", "blue", "blue"]})
    (root / "red" / "broken.jpg").write_bytes(truncated_jpeg())
    (root / "blue" / "notes.jpg").write_text("not an image")
    data = read_labelled(DataSpec(str(root)))
    (root / "blue" / "2.png").unlink()  # gone between reading the list and decoding
    features = image_features(model, data.images, batch_size=4, workers=0)
    kept = drop_undecodable(data, features, EvalTransform(32))
    assert data.skipped_by_reason == {"corrupt_image": 2, "missing_image": 1}
    assert len(kept) == len(data) == 4 and not torch.isnan(kept).any()
    assert sorted(data.keys) == ["blue/0.png", "blue/sub/1.png", "red/0.png", "red/sub/1.png"]


def test_a_set_without_one_usable_image_is_an_error(tmp_path):
    (tmp_path / "set" / "red").mkdir(parents=True)
    (tmp_path / "set" / "red" / "broken.jpg").write_bytes(truncated_jpeg())
    data = read_labelled(DataSpec(str(tmp_path / "set")))
    features = image_features(create_model("ViT-Micro-16-32").eval(), data.images, workers=0)
    with pytest.raises(ValueError, match=r"set: no image could be used \(\{'corrupt_image': 1\}\)"):
        drop_undecodable(data, features, EvalTransform(32))
