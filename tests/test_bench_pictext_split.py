"""The validation split of the pictext shards: one style held out whole."""

from __future__ import annotations

import json

from bench.pictext_split import TRAIN_SHARDS, split

from conftest import PICTEXT_CLASSES, fake_pictext, read_shard


def test_the_held_out_style_is_absent_from_training_and_is_the_validation_set(tmp_path):
    pictext = fake_pictext(tmp_path / "pictext")
    counts = split(pictext, tmp_path / "out")
    assert counts["val-openmoji.tar"] == len(PICTEXT_CLASSES)
    train = {}
    for i in range(TRAIN_SHARDS):
        train.update(read_shard(tmp_path / "out" / f"train-{i}.tar"))
    val = read_shard(tmp_path / "out" / "val-openmoji.tar")
    styles = {json.loads(s["json"]).get("style") for s in train.values()}
    assert styles == {"google", None}  # clip art has no style; OpenMoji is gone whole
    assert len(train) == 2 * len(PICTEXT_CLASSES) + 1  # every Google image, variants included
    # Validation: OpenMoji's plain images of the class names only.
    assert sorted(val) == sorted(f"emoji-openmoji-{i}" for i in range(len(PICTEXT_CLASSES)))
    assert all(set(s) == {"png", "txt", "json"} for s in (*train.values(), *val.values()))
    assert not list((tmp_path / "out").glob("*.partial"))


def test_the_captions_files_hold_one_training_caption_a_line(tmp_path):
    pictext = fake_pictext(tmp_path / "pictext")
    counts = split(pictext, tmp_path / "out")
    lines = (tmp_path / "out" / "captions.txt").read_text().splitlines()
    every = (tmp_path / "out" / "captions-all.txt").read_text().splitlines()
    assert len(lines) == counts["captions.txt"] == 2 * len(PICTEXT_CLASSES) + 1
    assert len(every) == counts["captions-all.txt"] == 4 * len(PICTEXT_CLASSES) + 2
    assert "emoji 3 google" in lines  # a two-line caption on one line
    assert not any("openmoji" in line for line in lines)  # no caption of the held-out style
    assert sum("openmoji" in line for line in every) == len(PICTEXT_CLASSES)
