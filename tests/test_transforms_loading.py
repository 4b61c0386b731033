"""Image loading (transforms/loading.py): JPEG draft and libjpeg-turbo decoding, load errors, batching and
pickling of the transforms."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from clipforge.transforms import EvalTransform, TrainTransform, load_image, preprocess_batch
from clipforge.transforms.loading import decode_jpeg_rgb
from sample_files import random_images


def _jpeg(size: tuple[int, int], mode: str = "RGB") -> bytes:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx % 251, yy % 241, (xx + yy) % 239, (xx * yy) % 233], axis=-1).astype(np.uint8)
    image = Image.fromarray(base[:, :, :3]).convert(mode) if mode != "CMYK" else Image.fromarray(base, "CMYK")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_load_image_drafts_large_jpeg_only_on_train_path(tmp_path: Path) -> None:
    data = _jpeg((1200, 900))
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    full = load_image(path)  # no target: full decode
    assert full.size == (1200, 900) and full.mode == "RGB"
    drafted = load_image(data, 224)  # needs a shorter side >= ceil(224 * 1.2172) = 273 -> 1/2 scale
    assert drafted.size == (600, 450) and drafted.mode == "RGB"
    assert min(drafted.size) >= math.ceil(224 * 1.2172)
    assert load_image(io.BytesIO(data), 100).size == (300, 225)  # 1/4: 225 >= 122
    assert load_image(data, 224, draft=False).size == (1200, 900)
    assert load_image(data, 500).size == (1200, 900)  # not 2x larger than needed: no draft
    assert EvalTransform(224).load(path).size == (1200, 900)  # the eval path never drafts
    train = TrainTransform(224, seed=0)
    decoded = train.load(data)  # a JPEG: an RGB array from libjpeg-turbo, at a reduced scale
    assert isinstance(decoded, np.ndarray) and decoded.shape[2] == 3
    assert train.min_source_side <= min(decoded.shape[:2]) < 900
    assert min(train.load(path).shape[:2]) == min(decoded.shape[:2])  # paths too
    cmyk = load_image(_jpeg((800, 800), "CMYK"), 64)
    assert cmyk.mode == "CMYK" and cmyk.size == (100, 100)  # 1/8: 100 >= 78
    png = io.BytesIO()
    Image.new("RGB", (1200, 900)).save(png, format="PNG")
    assert load_image(png.getvalue(), 64).size == (1200, 900)  # only JPEG can draft
    # why eval must not draft: decoding at reduced scale is not the same pixels
    assert not torch.equal(EvalTransform(64)(full), EvalTransform(64)(load_image(data, 64)))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_train_jpeg_decode_is_pils(mode: str) -> None:
    """libjpeg-turbo's RGB pixels are PIL's decode + convert("RGB"), bit for bit, and the transform of the
    array is the transform of the PIL image."""
    data = _jpeg((90, 70), mode)
    array = decode_jpeg_rgb(data, 40)  # 70 < 2 * 40: decoded at full scale
    pil = load_image(data)
    assert array is not None and np.array_equal(array, np.array(pil.convert("RGB")))
    t = TrainTransform(24, seed=1)
    assert torch.equal(t(array, key=3), t(pil, key=3))


def test_train_jpeg_decode_leaves_the_rest_to_pil() -> None:
    png = io.BytesIO()
    Image.new("RGB", (40, 30)).save(png, format="PNG")
    assert decode_jpeg_rgb(png.getvalue(), 8) is None
    assert decode_jpeg_rgb(_jpeg((40, 40), "CMYK"), 8) is None  # Adobe CMYK: PIL's conversion
    assert decode_jpeg_rgb(_jpeg((40, 40))[:200], 8) is None  # cut off: PIL decides
    assert isinstance(TrainTransform(8, seed=0).load(_jpeg((40, 40), "CMYK")), Image.Image)
    with pytest.raises(TypeError, match="RGB uint8"):
        TrainTransform(8, seed=0)(np.zeros((10, 10), dtype=np.uint8))


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(UnidentifiedImageError, match="bytes"):
        load_image(b"not an image")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(UnidentifiedImageError, match=r"bad\.jpg"):
        load_image(bad)
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_preprocess_batch_and_pickling() -> None:
    images = random_images(5)
    transform = EvalTransform(24)
    batch = preprocess_batch(images, transform)
    assert batch.shape == (5, 3, 24, 24) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([transform(im) for im in images]))
    buf = io.BytesIO()
    images[0].convert("RGB").save(buf, format="PNG")
    mixed = preprocess_batch([buf.getvalue(), images[1]], pickle.loads(pickle.dumps(transform)))
    assert torch.equal(mixed[0], transform(images[0].convert("RGB")))
    assert torch.equal(mixed[1], batch[1])
    train = TrainTransform(24, seed=5)
    assert preprocess_batch(images, train).shape == (5, 3, 24, 24)
    with pytest.raises(ValueError):
        preprocess_batch([], transform)
