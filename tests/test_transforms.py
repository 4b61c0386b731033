"""Image preprocessing: OpenAI parity (fixture from the real clip._transform), an independent numpy
reference, the train augmentation's determinism (loading and batching: test_transforms_loading.py)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from clipforge.transforms import (
    DEFAULT_TRAIN_RATIO,
    DEFAULT_TRAIN_SCALE,
    OPENAI_MEAN,
    OPENAI_STD,
    EvalTransform,
    TrainTransform,
    center_crop,
    image_transform,
    normalize,
    resize_shorter_side,
    sample_crop_box,
    to_tensor,
)
from sample_files import random_image, random_images

FIXTURE = Path(__file__).parent / "fixtures" / "transforms" / "openai_transform.npz"
SRC = Path(__file__).resolve().parents[1] / "src" / "clipforge" / "transforms"


# ----------------------------------------------------------------------------------------------------
# Parity with OpenAI's real transform (fixture written by scripts/make_transform_fixtures.py)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _fixture_image(fx: dict[str, np.ndarray], i: int) -> Image.Image:
    mode = str(fx[f"case{i}_mode"])
    size = tuple(int(v) for v in fx[f"case{i}_size"])
    image = Image.frombytes(mode, size, fx[f"case{i}_data"].tobytes())
    if f"case{i}_palette" in fx:
        image.putpalette(fx[f"case{i}_palette"].tobytes())
    return image


# Both pipelines resample with Pillow's C code, so the fixture holds OpenAI's outputs on the Pillow it was
# made with. Its outputs are bit-identical on every Pillow checked, from 11.0 on: the resize and mode
# conversion code is the same there. (Pillow 10 cannot resize I;16 images at all.) On a Pillow newer than
# these, a change of the bicubic filter's rounding (fixed-point coefficients, uint8 results) can move a
# pixel by one level, so each output may differ by at most 1 / (255 * std) after normalization; anything
# more is a real change and needs a new fixture (docs/preprocessing.md).
FIXTURE_PILLOW = "13.0.0"
PILLOW_CHECKED = ("11.0.0", "11.3.0", "12.0.0", "13.0.0")  # bit-identical on each


def pillow_levels(version: str) -> int:
    """How many uint8 levels an output may move on this Pillow: 0 up to the newest checked major, else 1."""
    major = int(version.split(".")[0])
    assert major >= 11, f"Pillow {version} is older than every version the fixture was checked on"
    return 0 if major <= int(PILLOW_CHECKED[-1].split(".")[0]) else 1


def test_openai_fixture_matches_on_this_pillow(openai_fixture: dict[str, np.ndarray]) -> None:
    fx = openai_fixture
    assert f"pillow {FIXTURE_PILLOW};" in str(fx["versions"])
    levels = pillow_levels(PIL.__version__)
    per_level = 1 / (255 * torch.tensor(OPENAI_STD).view(3, 1, 1))
    sizes = [int(n) for n in fx["sizes"]]
    modes = set()
    for i in range(int(fx["num_cases"])):
        image = _fixture_image(fx, i)
        modes.add(image.mode)
        for n in sizes:
            expected = torch.from_numpy(fx[f"case{i}_out{n}"])
            got = EvalTransform(n)(image)
            assert got.dtype == torch.float32 and got.shape == (3, n, n)
            # A float32 one-level step is exact to ~1e-6 of itself; the 1.001 only absorbs that rounding.
            moved = ((got - expected).abs() / per_level).max().item()
            assert moved <= levels * 1.001 if levels else torch.equal(got, expected), (
                image.mode,
                image.size,
                n,
                moved,
            )
    assert {"L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "RGB"} <= modes


def test_pillow_versions_and_their_bound() -> None:
    assert [pillow_levels(v) for v in (*PILLOW_CHECKED, "13.9.1", "14.0.0")] == [0, 0, 0, 0, 0, 1]
    with pytest.raises(AssertionError, match="older than every version"):
        pillow_levels("10.4.0")


def test_openai_fixture_is_order_sensitive(openai_fixture: dict[str, np.ndarray]) -> None:
    """Converting to RGB before resizing (the tempting shortcut) breaks the fixture for some modes."""
    fx = openai_fixture
    mismatched = set()
    for i in range(int(fx["num_cases"])):
        image = _fixture_image(fx, i)
        if image.mode == "RGB":
            continue
        for n in (int(v) for v in fx["sizes"]):
            if not torch.equal(
                EvalTransform(n)(image.convert("RGB")), torch.from_numpy(fx[f"case{i}_out{n}"])
            ):
                mismatched.add(image.mode)
    assert {"P", "RGBA", "LA", "1", "CMYK", "I;16"} <= mismatched


# ----------------------------------------------------------------------------------------------------
# Independent straightforward reference: plain PIL + numpy, none of the module's helpers
# ----------------------------------------------------------------------------------------------------


def _reference_eval(image: Image.Image, n: int) -> np.ndarray:
    w, h = image.size
    new = (n, n * h // w) if w <= h else (n * w // h, n)  # integer form of int(n * long / short)
    image = image.resize(new, Image.Resampling.BICUBIC)  # PIL returns a copy when the size is unchanged

    def offset(excess: int) -> int:  # round half to even, spelled out
        q, r = divmod(excess, 2)
        return q + (r if q % 2 else 0)

    left, top = offset(new[0] - n), offset(new[1] - n)
    rgb = image.crop((left, top, left + n, top + n)).convert("RGB")
    x = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(OPENAI_MEAN, dtype=np.float32)) / np.asarray(OPENAI_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


MODES = ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "RGB", "I", "F", "PA", "YCbCr", "RGBX"]
SIZES = [(1, 500), (500, 1), (37, 23), (23, 37), (5, 9), (16, 16), (17, 16), (16, 19), (23, 16), (41, 40)]


@pytest.mark.parametrize("mode", MODES)
def test_eval_matches_independent_reference(mode: str) -> None:
    rng = np.random.default_rng(sum(map(ord, mode)))
    for size in SIZES:
        image = random_image(rng, mode, size)
        for n in (16, 21):
            got = EvalTransform(n)(image)
            assert got.shape == (3, n, n) and got.dtype == torch.float32
            assert torch.equal(got, torch.from_numpy(_reference_eval(image, n))), (mode, size, n)


def test_center_crop_offsets_round_half_to_even() -> None:
    """Excess 1, 3, 5, 7 px: offsets 0, 2, 2, 4 (not floor, not ceil)."""
    row = np.arange(16 + 7, dtype=np.uint8) * 10
    for excess, offset in [(1, 0), (3, 2), (5, 2), (7, 4)]:
        image = Image.fromarray(np.tile(row[: 16 + excess], (16, 1)))
        got = EvalTransform(16)(image)
        expected = (np.float32(row[offset]) / np.float32(255) - np.float32(OPENAI_MEAN[0])) / np.float32(
            OPENAI_STD[0]
        )
        assert got[0, 0, 0].item() == expected


def test_public_steps_compose_to_the_transform(openai_fixture: dict[str, np.ndarray]) -> None:
    """The torch-op steps (to_tensor, normalize) give the transform's bits (it computes them in numpy)."""
    fx = openai_fixture
    for i in range(int(fx["num_cases"])):
        image = _fixture_image(fx, i)
        for n in (int(v) for v in fx["sizes"]):
            rgb = center_crop(resize_shorter_side(image, n), n).convert("RGB")
            steps = normalize(to_tensor(rgb), OPENAI_MEAN, OPENAI_STD)
            assert torch.equal(steps, torch.from_numpy(fx[f"case{i}_out{n}"]))


def test_eval_output_range_and_default_dtype() -> None:
    rng = np.random.default_rng(0)
    image = random_image(rng, "RGB", (45, 30))
    out = EvalTransform(24)(image)
    lo = (0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    hi = (1 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert bool(((out >= lo.view(3, 1, 1)) & (out <= hi.view(3, 1, 1))).all())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # OpenAI's ToTensor follows the default dtype; so do we
    try:
        out64 = EvalTransform(24)(image)
    finally:
        torch.set_default_dtype(previous)
    assert out64.dtype == torch.float64
    # float32 rounds x / 255 and - mean (under 6e-8 each, on values below 1, then scaled by 1 / std < 3.9)
    # and / std (under 1.2e-7 on values up to 2.2); the float64 result is rounded once more to compare
    # (1.2e-7): under 7e-7 in all.
    assert torch.allclose(out64.float(), out, atol=1e-6, rtol=0)


def test_constants_and_factory() -> None:
    assert OPENAI_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_STD == (0.26862954, 0.26130258, 0.27577711)
    assert isinstance(image_transform(224), EvalTransform)
    assert isinstance(image_transform(224, train=True, seed=0), TrainTransform)
    with pytest.raises(ValueError):
        image_transform(224, seed=0)  # eval is not random
    with pytest.raises(ValueError):
        image_transform(0)
    with pytest.raises(TypeError):
        EvalTransform(8)(np.zeros((8, 8, 3), dtype=np.uint8))  # type: ignore[arg-type]


def test_no_torchvision_import() -> None:
    trees = [ast.parse(path.read_text()) for path in sorted(SRC.glob("*.py"))]
    nodes = [node for tree in trees for node in ast.walk(tree)]
    names = [a.name for node in nodes if isinstance(node, ast.Import) for a in node.names]
    names += [node.module or "" for node in nodes if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("torchvision", "open_clip", "clip")]


# ----------------------------------------------------------------------------------------------------
# Train transform
# ----------------------------------------------------------------------------------------------------


def test_train_deterministic_for_seed_and_varies_across_seeds() -> None:
    images = random_images(6)
    t = TrainTransform(24, seed=7)
    run1 = [t(im) for im in images]
    t = TrainTransform(24, seed=7)
    assert all(torch.equal(x, t(im)) for x, im in zip(run1, images, strict=True))
    other = TrainTransform(24, seed=8)
    assert not all(torch.equal(x, other(im)) for x, im in zip(run1, images, strict=True))
    g = torch.Generator().manual_seed(7)
    from_gen = TrainTransform(24, generator=g)
    assert all(torch.equal(x, from_gen(im)) for x, im in zip(run1, images, strict=True))
    for x in run1:
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert x.min() >= -1.8 and x.max() <= 2.2  # (0 - mean) / std .. (1 - mean) / std


def test_train_resume_pickle_and_keys() -> None:
    images = random_images(8)
    t = TrainTransform(20, seed=3)
    head = [t(im) for im in images[:3]]
    state = t.state_dict()
    blob = pickle.dumps(t)
    tail = [t(im) for im in images[3:]]
    resumed = TrainTransform(20, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed(im)) for x, im in zip(tail, images[3:], strict=True))
    unpickled = pickle.loads(blob)
    assert all(torch.equal(x, unpickled(im)) for x, im in zip(tail, images[3:], strict=True))
    t.reseed(3)
    assert torch.equal(head[0], t(images[0]))
    # key=: the crop depends on (seed, key) only, not on call order or the stream position
    keyed = [t(im, key=k) for k, im in enumerate(images)]
    fresh = TrainTransform(20, seed=3)
    for k in reversed(range(len(images))):
        assert torch.equal(keyed[k], fresh(images[k], key=k))
    assert not torch.equal(fresh(images[3], key=1), fresh(images[3], key=2))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_train_resize_matches_pil_bicubic(mode: str) -> None:
    """RGB and L go through torch's uint8 bicubic (within a level of PIL's); other modes through PIL."""
    rng = np.random.default_rng(0)
    for target, size in [(24, (90, 70)), (40, (33, 30))]:  # shrinking, and enlarging
        image = random_image(rng, mode, size)
        t = TrainTransform(target, seed=0)
        left, top, cw, ch = t.crop_box(*image.size, key=5)
        pil = image.crop((left, top, left + cw, top + ch)).resize((target, target), Image.Resampling.BICUBIC)
        expected = normalize(to_tensor(pil.convert("RGB")), OPENAI_MEAN, OPENAI_STD)
        levels = (t(image, key=5) - expected).abs() * torch.tensor(OPENAI_STD).view(3, 1, 1) * 255
        assert float(levels.max()) <= (1.0 + 1e-3 if mode in ("RGB", "L") else 0.0)


def test_crop_boxes_follow_scale_and_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    for w, h in [(640, 480), (480, 640), (100, 100), (1, 500), (500, 1), (3, 2), (1000, 10)]:
        for _ in range(200):
            left, top, cw, ch = sample_crop_box(w, h, DEFAULT_TRAIN_SCALE, DEFAULT_TRAIN_RATIO, g)
            assert left >= 0 and top >= 0 and cw > 0 and ch > 0 and left + cw <= w and top + ch <= h
    fracs, ratios = [], []
    for _ in range(500):
        _, _, cw, ch = sample_crop_box(400, 300, DEFAULT_TRAIN_SCALE, DEFAULT_TRAIN_RATIO, g)
        fracs.append(cw * ch / (400 * 300))
        ratios.append(cw / ch)
    assert min(fracs) >= 0.88 and max(fracs) <= 1.0
    assert min(ratios) >= 0.74 and max(ratios) <= 4 / 3 + 0.01
    assert max(fracs) - min(fracs) > 0.05  # it is actually random


def test_min_source_side_never_upsamples() -> None:
    t = TrainTransform(32, seed=0)
    side = t.min_source_side
    g = torch.Generator().manual_seed(1)
    for w, h in [(side, side), (side, 3 * side), (5 * side, side), (side + 1, side)]:
        for _ in range(300):
            _, _, cw, ch = sample_crop_box(w, h, t.scale, t.ratio, g)
            assert cw >= 32 and ch >= 32
