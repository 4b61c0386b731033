"""The fine-tuning recipe's split of the pictext shards: by style, by class, the same on every run."""

from __future__ import annotations

import json

from bench.finetune import TRAIN_SHARDS, _is_train_class, split_shards

from sample_files import PICTEXT_CLASSES as CLASSES
from sample_files import fake_pictext, read_shard, read_shards


def test_the_split_is_by_style_and_class(tmp_path):
    pictext = fake_pictext(tmp_path / "pictext")
    counts = split_shards(pictext, tmp_path / "out")
    train = read_shards(tmp_path / "out" / f"google-train-{i}.tar" for i in range(TRAIN_SHARDS))
    test = read_shard(tmp_path / "out" / "google-test.tar")
    openmoji = read_shard(tmp_path / "out" / "openmoji-test.tar")
    labels = {
        name: {json.loads(s["json"])["label"] for s in d.values()}
        for name, d in (("train", train), ("test", test))
    }
    assert (
        labels["train"] and labels["test"] and not labels["train"] & labels["test"]
    )  # no class on both sides
    assert labels["train"] == {c for c in CLASSES if _is_train_class(c)}
    assert len(train) == 2 * len(labels["train"])  # every skin-tone variant of a training class
    assert not any(key.endswith("-dark") for key in test)  # the test sets hold plain images only
    assert sorted(openmoji) == sorted(f"emoji-openmoji-{i}" for i in range(len(CLASSES)))
    assert all(set(s) == {"png", "txt", "json"} for s in (*train.values(), *test.values()))
    assert sum(counts.values()) == len(train) + len(test) + len(openmoji)
    again = split_shards(pictext, tmp_path / "again")
    assert again == counts and read_shard(tmp_path / "again" / "google-test.tar") == test
