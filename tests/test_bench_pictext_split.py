"""The validation split of the pictext shards: emoji held out in one style, kept in the other."""

from __future__ import annotations

import json

from bench.pictext_split import HELD_OUT, TRAIN_SHARDS, _class_position, split

from sample_files import PICTEXT_CLASSES, fake_pictext, read_shard, read_shards


def _held_out_in(style: str) -> set[str]:
    low, high = HELD_OUT[style]
    return {c for c in PICTEXT_CLASSES if low <= _class_position(c) < high}


def test_each_validation_emoji_was_trained_in_the_other_style_only(tmp_path):
    pictext = fake_pictext(tmp_path / "pictext")
    counts = split(pictext, tmp_path / "out")
    train = read_shards(tmp_path / "out" / f"train-{i}.tar" for i in range(TRAIN_SHARDS))
    val = read_shard(tmp_path / "out" / "val.tar")
    trained = {(m.get("style"), m.get("label")) for m in (json.loads(s["json"]) for s in train.values())}
    held = {style: _held_out_in(style) for style in HELD_OUT}
    assert held["google"] and held["openmoji"] and not held["google"] & held["openmoji"]
    for key, sample in val.items():
        meta = json.loads(sample["json"])
        other = "openmoji" if meta["style"] == "google" else "google"
        assert meta["label"] in held[meta["style"]] and not key.endswith("-dark")  # plain images only
        assert (meta["style"], meta["label"]) not in trained and (other, meta["label"]) in trained
    assert len(val) == counts["val.tar"] == len(held["google"]) + len(held["openmoji"])
    kept = 4 * len(PICTEXT_CLASSES) - 2 * len(val) + 2  # variants of held-out images go nowhere
    assert len(train) == kept and (None, None) in trained  # clip art (no style, no label) stays
    assert all(set(s) == {"png", "txt", "json"} for s in (*train.values(), *val.values()))
    assert not list((tmp_path / "out").glob("*.partial"))


def test_the_captions_files_hold_one_training_caption_a_line(tmp_path):
    pictext = fake_pictext(tmp_path / "pictext")
    counts = split(pictext, tmp_path / "out")
    lines = (tmp_path / "out" / "captions.txt").read_text().splitlines()
    every = (tmp_path / "out" / "captions-all.txt").read_text().splitlines()
    assert len(lines) == counts["captions.txt"] == sum(counts[f"train-{i}.tar"] for i in range(TRAIN_SHARDS))
    assert len(every) == counts["captions-all.txt"] == 4 * len(PICTEXT_CLASSES) + 2
    held = sorted(_held_out_in("google"))[0]
    assert f"{held} openmoji" in lines and f"{held} google" not in lines  # the held-out image's caption
    assert f"{held} google" in every  # two-line captions are joined into one line
