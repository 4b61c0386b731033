"""OpenAI CLIP's eval transform, bit for bit, and the small steps it is made of.

`EvalTransform(n)` reproduces `clip.clip._transform(n)`: resize the shorter side to n (PIL bicubic), center
crop, convert to RGB after the crop, uint8 -> float / 255, subtract the mean, divide by the std. Each step
is a public function so tests and the train transform reuse it; docs/preprocessing.md has the reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from .loading import ImageSource

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing so the shorter side is ``size``: long side ``int(size * long / short)``.

    The float expression is deliberate: it is how torchvision's ``Resize(int)`` computes the size for a
    PIL image, and what OpenAI's checkpoints were evaluated with.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic-resize ``image`` so its shorter side is ``size``; returns ``image`` itself if already there.

    PIL chooses how each mode is resampled ("1" and "P" fall back to nearest, "LA"/"RGBA" resample
    premultiplied); that is exactly what OpenAI's transform gets too, because it is the same PIL call.
    """
    width, height = image.size
    new_size = shorter_side_size(width, height, size)
    if new_size == (width, height):
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL box ``(left, top, right, bottom)`` of the centered ``size x size`` square.

    Offsets are ``int(round((side - size) / 2.0))``: Python's round, so an exact half goes to the even
    integer (an excess of 1 gives offset 0, 3 gives 2, 5 gives 2, 7 gives 4).
    """
    if width < size or height < size:
        raise ValueError(f"cannot center-crop {size}x{size} from a {width}x{height} image")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return left, top, left + size, top + size


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the centered ``size x size`` square (see `center_crop_box` for the rounding)."""
    return image.crop(center_crop_box(image.width, image.height, size))


def to_tensor(image: Image.Image, dtype: torch.dtype | None = None) -> torch.Tensor:
    """8-bit PIL image -> float CHW tensor in [0, 1]: uint8 HWC, permute to CHW, cast, then divide by 255.

    ``dtype`` defaults to ``torch.get_default_dtype()`` (as OpenAI's pipeline does). Mode "1" maps to
    0 / 1. Modes with more than 8 bits per band ("I", "I;16", "F", ...) are rejected: convert first.
    """
    if dtype is None:
        dtype = torch.get_default_dtype()
    if image.mode == "1":
        array = np.array(image, dtype=np.uint8) * np.uint8(255)
    else:
        array = np.array(image)
        if array.dtype != np.uint8:
            raise ValueError(f"to_tensor expects an 8-bit image, got mode {image.mode!r}; convert it first")
    if array.ndim == 2:
        array = array[:, :, None]
    chw = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return chw.to(dtype).div(255)


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(tensor - mean) / std`` per channel (dim -3), mean and std cast to ``tensor.dtype`` first.

    Subtract then divide (not multiply by a reciprocal): the same two IEEE operations, in the same
    order and precision, as OpenAI's pipeline, hence the same bits. Returns a new tensor.
    """
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    if bool((std_t == 0).any()):
        raise ValueError(f"std must be non-zero, got {tuple(std)}")
    return tensor.sub(mean_t.view(-1, 1, 1)).div(std_t.view(-1, 1, 1))


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def _rgb_to_normalized(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``normalize(to_tensor(image), mean, std)`` for an RGB image, computed in numpy (see below)."""
    if image.mode != "RGB":
        return normalize(to_tensor(image), mean, std)
    return hwc_to_normalized(np.asarray(image, dtype=np.uint8), mean, std)


def hwc_to_normalized(array: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A uint8 ``[H, W, 3]`` array -> normalized float ``[3, H, W]``: ``normalize(to_tensor(.))``'s bits.

    The same IEEE operations in the same order and precision (cast, / 255, - mean, / std), so the same
    bits, but without torch's intra-op thread pool, whose wake-ups dominate on 3 x 224 x 224 tensors.
    Falls back to the torch ops for default dtypes numpy does not share (float16, bfloat16).
    """
    dtype = torch.get_default_dtype()
    np_dtype = _NUMPY_FLOAT.get(dtype)
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    if np_dtype is None:
        return normalize(torch.from_numpy(chw).to(dtype).div(255), mean, std)
    x = chw.astype(np_dtype)
    x /= np_dtype(255)
    x -= np.asarray(mean, dtype=np_dtype)[:, None, None]
    x /= np.asarray(std, dtype=np_dtype)[:, None, None]
    return torch.from_numpy(x)


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean_t} and {std_t}")
    if any(s == 0 for s in std_t):
        raise ValueError(f"std must be non-zero, got {std_t}")
    return mean_t, std_t


def _require_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}; use load_image() first")
    return image


class EvalTransform:
    """OpenAI CLIP's eval preprocessing (``clip.clip._transform(image_size)``), bit-identical.

    Picklable (plain attributes), so it can be handed to DataLoader workers.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        self.image_size = _check_size(image_size)
        self.mean, self.std = _check_stats(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _require_image(image)
        image = resize_shorter_side(image, self.image_size)
        image = center_crop(image, self.image_size)
        image = image.convert("RGB")  # after the crop: converting first changes bits for LA/RGBA/P/...
        return _rgb_to_normalized(image, self.mean, self.std)

    def load(self, source: ImageSource, max_pixels: int | None = None) -> Image.Image:
        """Decode ``source`` at full resolution (no draft: the eval path must stay exact).

        ``max_pixels``: larger images raise `ImageTooLarge` (None: the default limit; 0: none)."""
        from .loading import load_image  # not at the top: loading builds on this module

        return load_image(source, None, max_pixels=max_pixels)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


# ----------------------------------------------------------------------------------------------------
# Train augmentation
# ----------------------------------------------------------------------------------------------------
