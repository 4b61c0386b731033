"""The train augmentation: a seeded, resumable random resized crop (OpenCLIP's default), then RGB,
tensor and normalisation exactly as the eval transform does them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .exact import OPENAI_MEAN, OPENAI_STD, _check_size, _check_stats, _require_image, hwc_to_normalized

if TYPE_CHECKING:
    from .loading import ImageSource

DEFAULT_TRAIN_SCALE: tuple[float, float] = (0.9, 1.0)  # OpenCLIP's default RandomResizedCrop area range
DEFAULT_TRAIN_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratio (w / h) range

_CROP_ATTEMPTS = 10  # rejection-sampling tries before the deterministic fallback crop


def _check_range(name: str, pair: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in pair)
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {tuple(pair)}")
    return lo, hi


def sample_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Random-resized-crop parameters ``(left, top, crop_width, crop_height)`` for a ``width x height`` image.

    Up to 10 tries: area fraction uniform in ``scale``, aspect ratio (w / h) log-uniform in ``ratio``;
    the first box that fits is placed uniformly at random. If none fits, the largest centered box whose
    aspect is clamped into ``ratio`` is used. Every random number comes from ``generator``.
    """
    s_lo, s_hi = _check_range("scale", scale)
    r_lo, r_hi = _check_range("ratio", ratio)
    area = width * height
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    for _ in range(_CROP_ATTEMPTS):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (s_lo + (s_hi - s_lo) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return left, top, crop_w, crop_h
    aspect_in = width / height
    if aspect_in < r_lo:
        crop_w, crop_h = width, min(height, round(width / r_lo))
    elif aspect_in > r_hi:
        crop_w, crop_h = min(width, round(height * r_hi)), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def _min_crop_fraction(scale: tuple[float, float], ratio: tuple[float, float]) -> float:
    """Lower bound on (crop side) / (image shorter side) over every box `sample_crop_box` can return."""
    # A tried box has area >= s_lo * W * H >= s_lo * short**2 and aspect in ratio, so its width is
    # >= short * sqrt(s_lo * r_lo) and its height >= short * sqrt(s_lo / r_hi). The fallback box keeps
    # one full side and the other >= min(1, 1 / r_lo, r_hi) of the shorter side.
    s_lo, (r_lo, r_hi) = scale[0], ratio
    return min(1.0, math.sqrt(s_lo * r_lo), math.sqrt(s_lo / r_hi), 1.0 / r_lo, r_hi)


def _mix_seed(seed: int, key: int) -> int:
    """A 63-bit seed from (seed, key): splitmix64 finalizer over both, so nearby keys decorrelate."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + key + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


# Modes resized by `resize_bicubic` after conversion to RGB. PIL resizes the others in their own mode,
# with results RGB conversion cannot reproduce (alpha premultiplied, 16/32-bit values, CMYK, palettes):
# for those the PIL resize is kept, so every mode matches torchvision's RandomResizedCrop.
_FAST_MODES = ("RGB", "L")


def resize_bicubic(array: np.ndarray, size: int) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` array resized to ``[size, size, 3]``: bicubic, antialiased when shrinking.

    torch's uint8 kernel (channels-last, vectorized) instead of PIL's: about 3x faster on small images,
    the data worker's largest cost, and within 1-2 levels of PIL's bicubic (which uses the same
    a = -0.5 kernel; they round differently).
    """
    if array.shape[:2] == (size, size):
        return array
    chw = torch.from_numpy(array).permute(2, 0, 1)[None]  # a channels-last view, no copy
    resized = F.interpolate(chw, size=(size, size), mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


class TrainTransform:
    """Random resized crop (bicubic) to ``image_size`` -> tensor -> normalize (OpenCLIP's default).

    RGB and grayscale crops are resized by `resize_bicubic` (torch's uint8 kernel, not PIL's: 3x faster,
    within 1-2 levels of torchvision's `RandomResizedCrop` for the same box); other modes by PIL in
    their own mode, then converted to RGB.

    Randomness:

    * default: a stream from the transform's own `torch.Generator` (from ``generator``, else seeded with
      ``seed``, else with a seed drawn from torch's global RNG, so ``torch.manual_seed`` makes it
      reproducible). Checkpoint with `state_dict` / `load_state_dict`; pickling keeps the stream position.
      Each DataLoader worker gets a copy of the same stream, so call `reseed` in ``worker_init_fn``
      (or use ``key``).
    * ``transform(image, key=i)``: the crop depends only on (``seed``, ``i``) and the image size, not on
      call order: deterministic and resumable however samples are sharded across workers.
    """

    def __init__(
        self,
        image_size: int,
        *,
        scale: Sequence[float] = DEFAULT_TRAIN_SCALE,
        ratio: Sequence[float] = DEFAULT_TRAIN_RATIO,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.image_size = _check_size(image_size)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        self.mean, self.std = _check_stats(mean, std)
        if generator is not None and seed is not None:
            raise ValueError("pass seed or generator, not both")
        if generator is not None:
            self.generator = generator
            self.seed = int(generator.initial_seed())
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            self.seed = int(seed)
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def min_source_side(self) -> int:
        """Shortest source side that never needs upsampling: every possible crop is >= ``image_size``."""
        return math.ceil(self.image_size / _min_crop_fraction(self.scale, self.ratio)) + 1

    def reseed(self, seed: int) -> None:
        """Restart the stream from ``seed`` (e.g. ``base_seed + worker_id`` in a worker_init_fn)."""
        self.seed = int(seed)
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, object]:
        return {"seed": self.seed, "generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.seed = int(state["seed"])  # type: ignore[call-overload]
        self.generator.set_state(state["generator_state"])  # type: ignore[arg-type]

    def crop_box(self, width: int, height: int, *, key: int | None = None) -> tuple[int, int, int, int]:
        """Draw the next ``(left, top, crop_width, crop_height)`` (or the one for ``key``)."""
        if key is None:
            generator = self.generator
        else:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, int(key)))
        return sample_crop_box(width, height, self.scale, self.ratio, generator)

    def __call__(self, image: Image.Image | np.ndarray, *, key: int | None = None) -> torch.Tensor:
        """``image``: a PIL image, or an RGB uint8 ``[H, W, 3]`` array (what `load` gives for JPEGs)."""
        if isinstance(image, np.ndarray):
            return self._from_rgb_array(image, key)
        image = _require_image(image)
        left, top, crop_w, crop_h = self.crop_box(image.width, image.height, key=key)
        crop = image.crop((left, top, left + crop_w, top + crop_h))
        size = (self.image_size, self.image_size)
        if crop.mode not in _FAST_MODES and crop.size != size:
            crop = crop.resize(size, Image.Resampling.BICUBIC)  # in its own mode, as torchvision would
        return hwc_to_normalized(
            resize_bicubic(np.array(crop.convert("RGB")), self.image_size), self.mean, self.std
        )

    def _from_rgb_array(self, image: np.ndarray, key: int | None) -> torch.Tensor:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TypeError(f"expected an RGB uint8 [H, W, 3] array, got {image.dtype} {list(image.shape)}")
        left, top, crop_w, crop_h = self.crop_box(image.shape[1], image.shape[0], key=key)
        crop = np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w])
        return hwc_to_normalized(resize_bicubic(crop, self.image_size), self.mean, self.std)

    def load(self, source: ImageSource, max_pixels: int | None = None) -> Image.Image | np.ndarray:
        """Decode ``source``, letting a large JPEG decode at reduced scale (never below `min_source_side`).

        JPEGs come back as RGB uint8 arrays (libjpeg-turbo, no PIL image), everything else as PIL images;
        `__call__` takes both. ``max_pixels``: larger images raise `ImageTooLarge` from their header
        (None: the default limit; 0: none).
        """
        from .loading import decode_jpeg_rgb, load_image  # not at the top: loading builds on this module

        array = decode_jpeg_rgb(source, self.min_source_side, max_pixels)
        if array is not None:
            return array
        return load_image(source, self.min_source_side, margin=1.0, max_pixels=max_pixels)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"mean={self.mean}, std={self.std}, seed={self.seed})"
        )
