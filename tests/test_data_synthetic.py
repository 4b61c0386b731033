"""The synthetic dataset: deterministic, held-out pairs never trained on, pictures that match captions."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
import torch

from clipforge.data import DataConfig, build_train_loader, synthetic, synthetic_zeroshot_set
from clipforge.data.synthetic import COLOURS, HELDOUT, SHAPES, Scene, SyntheticSource, render
from conftest import stub_tokenizer


def test_sample_is_a_function_of_seed_and_index():
    a, b = SyntheticSource(32, 100, seed=0), SyntheticSource(32, 100, seed=0)
    first, again = a[7], b[7]
    assert first.caption == again.caption
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    other = SyntheticSource(32, 100, seed=1)[7]
    assert not np.array_equal(np.asarray(other.image), np.asarray(first.image))
    assert first.image.size == (32, 32) and first.image.mode == "RGB"


def test_heldout_pairs_never_appear_in_training():
    source = SyntheticSource(32, 3000, seed=0)
    pairs, captions = set(), []
    for i in range(len(source)):
        scene, rng = source.scene(i)
        pairs.add((scene.colour, scene.shape))
        captions.append(synthetic.describe(scene, rng))
    assert pairs.isdisjoint(HELDOUT)
    assert pairs == set(synthetic.training_pairs()) and len(pairs) == 56
    for colour, shape in HELDOUT:  # the caption's words, in any form (plural, with a size between)
        pattern = re.compile(rf"\b{colour} {shape}")
        assert not any(pattern.search(c) for c in captions), (colour, shape)
    # Latin square: every colour and every shape is still trained on, with 7 partners each.
    assert {c for c, _ in pairs} == set(COLOURS) and {s for _, s in pairs} == set(SHAPES)
    assert len(HELDOUT) == 8 and len({c for c, _ in HELDOUT}) == 8 and len({s for _, s in HELDOUT}) == 8


def test_holdout_can_be_switched_off():
    source = SyntheticSource(32, 2000, seed=0, holdout=False)
    pairs = {(s.colour, s.shape) for s in (source.scene(i)[0] for i in range(len(source)))}
    assert pairs >= HELDOUT


def test_captions_describe_the_scene():
    rng = random.Random(0)
    scene = Scene("orange", "cross", "small", 2, "left")
    captions = {synthetic.describe(scene, rng) for _ in range(200)}
    assert all("orange crosses" in c for c in captions)
    assert all("on the left" in c or c.endswith("light background") for c in captions)
    assert all(c.startswith(("two", "a picture", "a drawing", "there are", "on the left")) for c in captions)
    one = {synthetic.describe(Scene("orange", "star", "large", 1, None), rng) for _ in range(100)}
    assert not any(re.search(r"\ba orange\b|\ban large\b", c) for c in one)  # the article fits the next word
    assert any("an orange star" in c for c in one) and any("a large orange star" in c for c in one)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_pictures_show_the_named_colour(colour):
    rng = random.Random(1)
    image = np.asarray(render(Scene(colour, "square", "large", 1, "middle"), rng, 64)).astype(int)
    target = np.array(COLOURS[colour])
    close = (np.abs(image - target).max(axis=-1) <= 30).sum()
    assert close > 0.1 * 64 * 64  # a large square covers ~15% of the picture
    corner = image[:4, :4].reshape(-1, 3).mean(axis=0)
    assert corner.min() > 160  # light background


def test_several_copies_are_drawn_apart():
    rng = random.Random(3)
    for position in ("left", "top", None):
        spots = synthetic._layout(Scene("red", "circle", "small", 3, position), rng, 64)
        for (x1, y1, r), (x2, y2, _) in itertools.pairwise(spots):
            assert (x1 - x2) ** 2 + (y1 - y2) ** 2 > (2 * r) ** 2
        assert all(r <= x <= 64 - r and r <= y <= 64 - r for x, y, r in spots)


def test_zeroshot_set_heldout_and_all():
    held = synthetic_zeroshot_set(n_per_class=2, image_size=32, seed=0)
    assert held.images.shape == (16, 3, 32, 32) and held.images.dtype == torch.float32
    assert len(held.classnames) == 64 and held.classnames[0] == "red circle"
    assert set(held.labels.tolist()) == set(synthetic.HELDOUT_CLASSES)
    assert {tuple(held.classnames[i].split()) for i in held.labels.tolist()} == HELDOUT
    again = synthetic_zeroshot_set(n_per_class=2, image_size=32, seed=0)
    assert torch.equal(held.images, again.images)
    everything = synthetic_zeroshot_set(n_per_class=1, image_size=32, split="all")
    assert everything.labels.tolist() == list(range(64))
    seen = synthetic_zeroshot_set(n_per_class=1, image_size=32, split="seen")
    assert len(seen.labels) == 56 and not set(seen.labels.tolist()) & set(synthetic.HELDOUT_CLASSES)
    assert all("{}" in t for t in synthetic.TEMPLATES)
    with pytest.raises(ValueError, match="split"):
        synthetic_zeroshot_set(1, 32, split="test")


def test_training_batches_from_the_synthetic_source():
    cfg = DataConfig(source="synthetic", batch_size=16, synthetic_samples=64, context_length=32)
    data = build_train_loader(cfg, stub_tokenizer, image_size=32, seed=0)
    assert data.samples_per_epoch == 64 and data.batches_per_epoch == 4
    batch = next(data.batches())
    assert batch.images.shape == (16, 3, 32, 32) and batch.tokens.shape == (16, 32)
    assert sum(batch.skipped.values()) == 0 and batch.index == 0 and batch.epoch == 0
    # The pipeline draws no crop: a batch image is sample i's picture, only normalised.
    source = data.source
    captions = [bytes(row[row > 0].tolist()).decode() for row in batch.tokens]
    index = next(i for i in range(64) if source[i].caption[:32] == captions[0])
    expected = data.make.transform(source[index].image)
    assert torch.equal(batch.images[0], expected)
