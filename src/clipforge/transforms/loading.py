"""Decoding images from paths, bytes or files (libjpeg draft decoding on the train path only); batching.

Every decode first reads the image's header and refuses an image of more than ``max_pixels`` pixels
(`ImageTooLarge`) before any pixel is decoded: a small file can declare a huge image (a 12,000 x 12,000
PNG of one colour is a few KB), and decoding it would take gigabytes in every worker that meets it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from typing import IO, Union

import numpy as np
import torch
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

try:  # libjpeg-turbo straight to numpy: the train path's JPEG decoder (2x faster than PIL + numpy)
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel: PIL decodes everything
    simplejpeg = None

from .augment import DEFAULT_TRAIN_RATIO, DEFAULT_TRAIN_SCALE, TrainTransform, _min_crop_fraction
from .exact import EvalTransform, _check_size

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Image.Image]

# 64 MP (8,000 x 8,000): above full-frame cameras' largest photos (61 MP), below Pillow's bomb warning
# (89 MP) and error (179 MP). At the limit an image decodes to 192 MB of RGB, and a PNG peaks near 0.8 GB
# in a training worker while it is cropped and resized (JPEGs decode at reduced scale); at 12,000 x
# 12,000, 1.8 GB.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class ImageTooLarge(ValueError):
    """The image's header declares more pixels than allowed; nothing was decoded."""


def check_pixels(width: int, height: int, max_pixels: int | None = None, source: object = None) -> None:
    """Raise `ImageTooLarge` if ``width * height`` exceeds ``max_pixels`` (None: the default; 0: no limit)."""
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit and width * height > limit:
        where = f" {_describe(source)}" if source is not None else ""
        raise ImageTooLarge(
            f"image{where} is {width} x {height} = {width * height:,} pixels, over the limit of {limit:,}"
        )


# 1 / 0.8216 for the default scale/ratio: a 224 target keeps a shorter side >= 273, so drafting starts
# at a 546 px shorter side (1/2 scale), and 1/4, 1/8 for 1092 px, 2184 px.
DEFAULT_DRAFT_MARGIN: float = 1.0 / _min_crop_fraction(DEFAULT_TRAIN_SCALE, DEFAULT_TRAIN_RATIO)


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def load_image(
    source: ImageSource,
    target_size: int | None = None,
    *,
    draft: bool = True,
    margin: float = DEFAULT_DRAFT_MARGIN,
    max_pixels: int | None = None,
) -> Image.Image:
    """Open and fully decode an image from a path, bytes, a binary file object or an unloaded PIL image.

    With ``target_size`` (train path only) and ``draft=True``, a JPEG whose shorter side is at least
    twice ``ceil(target_size * margin)`` is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, never going
    below that side; other formats, and JPEGs not that large, decode normally. The mode is unchanged
    (RGB conversion belongs after the crop). The result is loaded, with no file handle left open.
    Pass ``target_size=None`` for the eval path: a drafted decode is close to, but not bit-identical
    with, a full decode followed by resizing. An image over ``max_pixels`` pixels (None: the default,
    `DEFAULT_MAX_IMAGE_PIXELS`; 0: no limit) raises `ImageTooLarge` from its header alone; Pillow's
    own bomb check (179 MP) applies whatever the limit.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as fh:
                fp: IO[bytes] = io.BytesIO(fh.read())
        elif isinstance(source, (bytes, bytearray, memoryview)):
            fp = io.BytesIO(bytes(source))
        elif hasattr(source, "read"):
            fp = source
        else:
            raise TypeError(f"cannot load an image from {type(source).__name__}")
        try:
            image = Image.open(fp)  # reads the header only
        except UnidentifiedImageError as exc:
            raise UnidentifiedImageError(f"cannot identify image file {_describe(source)}") from exc
        except Image.DecompressionBombError as exc:  # over Pillow's own limit: too large all the same
            raise ImageTooLarge(f"image {_describe(source)}: {exc}") from exc
        check_pixels(image.width, image.height, max_pixels, source)
    if draft and target_size is not None:
        _maybe_draft(image, math.ceil(_check_size(target_size) * margin))
    image.load()
    return image


# Colour spaces libjpeg converts to RGB exactly as PIL's decode + convert("RGB") does (tested); CMYK and
# YCCK JPEGs (Adobe's inverted CMYK) are left to PIL.
_TURBO_SPACES = ("YCbCr", "Gray")
_JPEG_START = b"\xff\xd8\xff"  # start-of-image marker, then the next marker's 0xff


def decode_jpeg_rgb(source: ImageSource, min_side: int, max_pixels: int | None = None) -> np.ndarray | None:
    """A JPEG (bytes or path) as an RGB uint8 ``[H, W, 3]`` array, decoded by libjpeg-turbo (simplejpeg).

    Train path only. A JPEG at least twice ``min_side`` on both sides is decoded at a reduced libjpeg
    scale (a multiple of 1/8, at most 1/2) that keeps both sides >= ``min_side``. Returns None for
    anything it does not handle -- not a JPEG, CMYK, a decode error (PIL then decides whether the file
    is usable), simplejpeg not installed -- so the caller falls back to `load_image`. A JPEG whose
    header declares more than ``max_pixels`` pixels (as in `load_image`) raises `ImageTooLarge`.
    """
    if simplejpeg is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            if fh.read(3) != _JPEG_START:  # not a JPEG: leave the file to load_image, read once there
                return None
            source = _JPEG_START + fh.read()
    if not isinstance(source, (bytes, bytearray, memoryview)) or not simplejpeg.is_jpeg(source):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(source)
    except ValueError:
        return None
    check_pixels(width, height, max_pixels, source)
    if colorspace not in _TURBO_SPACES:
        return None
    try:
        return simplejpeg.decode_jpeg(
            source, colorspace="RGB", min_height=min_side, min_width=min_side, min_factor=2
        )
    except ValueError:
        return None


def _maybe_draft(image: Image.Image, min_side: int) -> None:
    """Request a reduced-scale JPEG decode keeping both sides >= ``min_side``, if that saves anything."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile) or not image.tile:
        return  # not a JPEG, or already decoded
    if min(image.size) < 2 * min_side:
        return  # no 2x reduction possible without going below min_side
    image.draft(None, (min_side, min_side))


def preprocess_batch(
    images: Iterable[Image.Image | ImageSource],
    transform: EvalTransform | TrainTransform,
) -> torch.Tensor:
    """Apply ``transform`` to each image and stack: float tensor ``[N, 3, H, W]``.

    Items that are not PIL images are decoded first with ``transform.load`` (no draft for eval).
    """
    loader = getattr(transform, "load", None)
    tensors = []
    for item in images:
        if not isinstance(item, Image.Image):
            item = loader(item) if loader is not None else load_image(item)
        tensors.append(transform(item))
    if not tensors:
        raise ValueError("preprocess_batch needs at least one image")
    return torch.stack(tensors)
