"""FLYP's training data: `data.captions = "templates"` captions each labelled image with a template filled
with its class name, the template picked by (sample, epoch) like any per-sample choice, unknown labels
skipped and counted, the fields checked before a run, and a short `clipforge train` on a labelled shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.configs import ConfigError
from clipforge.data import DataConfig, build_train_loader
from clipforge.data.labels import class_captions, label_index
from clipforge.data.pipeline import EpochOrder
from clipforge.data.samples import derive_seed
from clipforge.evaluate.prompts import load_prompts
from clipforge.train.validate import check_data
from conftest import captions_of, stub_tokenizer
from sample_files import COLOURS, labelled_samples, write_shard

NAMES = list(COLOURS)  # red, green, blue: each square's dominant channel is its class index
TEMPLATES = ["a photo of a {}.", "a {} square", "itap of the {}"]
SIZE = 16


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, Path]:
    """Two labelled shards of 12 squares, a class-folder tree, a CSV, the class file and templates."""
    root = tmp_path_factory.mktemp("flyp")
    write_shard(root / "train-0.tar", labelled_samples(NAMES * 4))
    write_shard(root / "train-1.tar", labelled_samples(NAMES * 4, start=12))
    (root / "classes.json").write_text(json.dumps(NAMES))
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    rows = ["filepath,label"]
    for i, name in enumerate(NAMES * 4):
        folder = root / "tree" / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), COLOURS[name]).save(folder / f"{i:02d}.png")
        rows.append(f"tree/{name}/{i:02d}.png,{name}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return {"root": root, "classes": root / "classes.json", "templates": root / "templates.txt"}


def templated(files: dict[str, Path], source: str, path: str, **fields) -> DataConfig:
    defaults = dict(batch_size=12, context_length=32, shuffle_buffer=0, augment=False)
    cfg = DataConfig(source=source, path=str(files["root"] / path), captions="templates", **defaults)
    cfg.classes, cfg.templates = str(files["classes"]), str(files["templates"])
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def take(cfg: DataConfig, count: int, start: int = 0, seed: int = 0, rank: int = 0, world: int = 1):
    data = build_train_loader(cfg, stub_tokenizer, SIZE, seed, rank, world)
    stream = data.batches(start)
    return [next(stream) for _ in range(count)]


def colour_of(images: torch.Tensor) -> list[str]:
    """Each normalised image's class, from its dominant channel."""
    return [NAMES[int(i)] for i in images.mean(dim=(2, 3)).argmax(dim=1)]


def class_in(caption: str) -> str:
    matches = [(t, n) for t in TEMPLATES for n in NAMES if t.format(n) == caption]
    assert len(matches) == 1, f"{caption!r} is no template filled with a class name"
    return matches[0][1]


@pytest.mark.parametrize(
    ("source", "path"), [("webdataset", "train-0.tar"), ("folder", "tree"), ("csv", "train.csv")]
)
def test_captions_are_templates_filled_with_each_image_s_class_name(labelled, source, path):
    batch = take(templated(labelled, source, path), 1)[0]
    assert len(batch) == 12 and batch.skipped["unknown_label"] == 0
    captions = captions_of(batch.tokens)
    assert [class_in(c) for c in captions] == colour_of(batch.images)  # each image with its own class


def test_the_template_is_keyed_by_the_sample_and_epoch(labelled):
    """The map-style choice is `derive_seed("template", derive_seed(epoch, sample key))`: the mechanism of
    `data.captions = "sample"`; it changes between epochs and not between identical runs."""
    cfg = templated(labelled, "folder", "tree")
    batches = take(cfg, 3)
    assert [b.epoch for b in batches] == [0, 1, 2]
    data = build_train_loader(cfg, stub_tokenizer, SIZE, 0)
    epochs = EpochOrder(len(data.source), cfg.batch_size, seed=0)  # each batch's samples, recomputed
    for g, batch in enumerate(batches):
        epoch, indices = epochs.batch(g)
        expected = []
        for index in indices:
            raw = data.source[index]
            key = derive_seed(epoch, raw.key)
            expected.append(TEMPLATES[derive_seed("template", key) % len(TEMPLATES)].format(raw.label))
        assert captions_of(batch.tokens) == expected
    per_epoch = [sorted(captions_of(b.tokens)) for b in batches]
    assert per_epoch[0] != per_epoch[1]  # a new draw each epoch: 12 samples x 3 templates
    assert [captions_of(b.tokens) for b in take(cfg, 3)] == [captions_of(b.tokens) for b in batches]
    assert len({c for b in batches for c in captions_of(b.tokens)}) > len(NAMES)  # several templates used


@pytest.mark.parametrize(
    ("source", "path", "streams"), [("folder", "tree", 0), ("webdataset", "train-{0..1}.tar", 2)]
)
def test_the_same_captions_on_any_number_of_processes_and_after_a_resume(labelled, source, path, streams):
    cfg = templated(labelled, source, path, shard_streams=streams, shuffle_buffer=4)
    whole = take(cfg, 4)
    halves = [take(cfg, 4, rank=rank, world=2) for rank in (0, 1)]
    for g, batch in enumerate(whole):
        joined = captions_of(halves[0][g].tokens) + captions_of(halves[1][g].tokens)
        assert joined == captions_of(batch.tokens)
        assert torch.equal(torch.cat([halves[0][g].images, halves[1][g].images]), batch.images)
    cfg.workers = 2  # the captions are made in the workers, as they are
    assert [captions_of(b.tokens) for b in take(cfg, 4)] == [captions_of(b.tokens) for b in whole]
    resumed = take(cfg, 2, start=2)
    assert [captions_of(b.tokens) for b in resumed] == [captions_of(b.tokens) for b in whole[2:]]
    assert [b.index for b in resumed] == [2, 3]


def test_unknown_labels_are_skipped_and_counted(labelled, tmp_path):
    samples = labelled_samples(NAMES * 4)
    samples[0]["json"] = {"label": "purple"}  # not a class
    del samples[1]["json"]  # no label at all
    samples[2]["json"] = {"label": 0}  # an index: red
    samples[3]["json"] = {"label": "2"}  # an index's text: blue
    samples[4]["json"] = "not json {"
    write_shard(tmp_path / "odd.tar", samples)
    cfg = templated(labelled, "webdataset", "train-0.tar")
    cfg.path = str(tmp_path / "odd.tar")
    batch = take(cfg, 1)[0]
    assert batch.skipped["unknown_label"] == 3 and len(batch) == 9
    captions = captions_of(batch.tokens)
    assert sum(class_in(c) == "red" for c in captions) == 3  # samples 3, 6, 9 (0 skipped) and 2 (index 0)
    assert sum(class_in(c) == "blue" for c in captions) == 4  # 5, 8, 11 and 3 ("2")


def test_class_folders_named_by_id_are_the_classes_in_sorted_order(tmp_path, labelled):
    # ImageNet's layout: n01440764/ ... ; with no folder named after a class, sorted folders = classes.
    for i, (wnid, name) in enumerate(zip(["n03", "n01", "n02"], ["blue", "red", "green"], strict=True)):
        (tmp_path / wnid).mkdir()
        for j in range(4):
            Image.new("RGB", (12, 12), COLOURS[name]).save(tmp_path / wnid / f"{i}{j}.png")
    Image.new("RGB", (12, 12), COLOURS["red"]).save(tmp_path / "loose.png")  # no class folder
    cfg = templated(labelled, "folder", "tree")
    cfg.path = str(tmp_path)
    batch = take(cfg, 1)[0]
    assert batch.skipped["unknown_label"] == 1  # loose.png; 13 files, the batch of 12 misses one
    assert [class_in(c) for c in captions_of(batch.tokens)] == colour_of(batch.images)
    assert label_index(NAMES, ["n01", "red", "x"])["red"] == 0  # a folder named after a class: by name


def check(cfg: DataConfig) -> str:
    with pytest.raises(ConfigError) as info:
        check_data(cfg.validate(), SIZE, seed=0)
    return str(info.value)


def test_the_fields_are_checked_before_a_run(labelled, tmp_path):
    def shard_cfg(**fields) -> DataConfig:
        return templated(labelled, "webdataset", "train-0.tar", **fields)

    check_data(shard_cfg(), SIZE, seed=0)  # a good config passes
    check_data(templated(labelled, "csv", "train.csv"), SIZE, seed=0)
    assert check(shard_cfg(classes=str(tmp_path / "nope.json"))).startswith("data.classes = ")
    (tmp_path / "bad.txt").write_text("a photo\n")
    assert "needs '{}'" in check(shard_cfg(templates=str(tmp_path / "bad.txt")))
    assert check(shard_cfg(templates="no placeholder")).startswith("data.templates = ")
    assert check(shard_cfg(label_key="class")).startswith("data.label_key = 'class': none of the first 8")
    assert check(templated(labelled, "csv", "train.csv", label_key="class")).startswith("data.label_key = ")
    (tmp_path / "other.json").write_text(json.dumps(["cat", "dog"]))
    message = check(templated(labelled, "folder", "tree", classes=str(tmp_path / "other.json")))
    assert message.startswith("data.classes = ") and "names none of the labels" in message
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "flat/a.png")
    flat = templated(labelled, "folder", "tree", batch_size=1)
    flat.path = str(tmp_path / "flat")
    assert check(flat).endswith("holds no class sub-folders")
    with pytest.raises(ValueError, match=r"data\.classes"):
        shard_cfg(classes="").validate()
    with pytest.raises(ValueError, match="needs labelled data"):
        DataConfig(captions="templates", classes="cifar10").validate()
    # Built-in sets work as for eval.classes; no data.templates: the set's own templates.
    check_data(shard_cfg(classes="cifar10", templates=""), SIZE, seed=0)
    builtin = class_captions("cifar10", "")
    assert builtin.classnames[0] == "airplane" and builtin.templates == tuple(
        load_prompts("cifar10").templates
    )
    assert class_captions(str(labelled["classes"]), "").templates == ("{}",)  # no templates: the bare name


def test_clipforge_train_fine_tunes_on_a_labelled_shard(
    labelled, tmp_path, tokenizer_dir, capsys, one_thread
):
    from clipforge.cli import main

    recipe = tmp_path / "flyp.toml"
    recipe.write_text(
        f"""
[model]
name = "ViT-Micro-16-32"
tokenizer = "{tokenizer_dir}"
[data]
source = "webdataset"
path = "{labelled["root"]}/train-{{0..1}}.tar"
captions = "templates"
classes = "{labelled["classes"]}"
templates = "{labelled["templates"]}"
batch_size = 8
context_length = 16
shard_streams = 2
[schedule]
steps = 2
warmup_steps = 1
[eval]
every = 0
data = "{labelled["root"]}/train-1.tar"
classes = "{labelled["classes"]}"
templates = "{labelled["templates"]}"
batch_size = 12
[run]
out_dir = "{tmp_path / "run"}"
progress = false
threads = 1
"""
    )
    assert main(["train", str(recipe)]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert 'captions = "templates"' in (tmp_path / "run/config.toml").read_text()
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if any(k.startswith("zeroshot_") for k in r)] == [2]
