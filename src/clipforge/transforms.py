"""Image preprocessing: OpenAI CLIP's exact eval transform and an OpenCLIP-style train augmentation.

No torchvision. Every step is PIL, numpy or torch, written out so the arithmetic (and its order) is
visible; see docs/preprocessing.md for the reasoning.

Eval (`EvalTransform`, `image_transform(n, train=False)`) reproduces `clip.clip._transform(n)` bit for bit:

1. resize so the shorter side is ``n`` (PIL bicubic; the longer side is ``int(n * long / short)``;
   an image already of that size is left untouched),
2. center crop ``n x n`` (offsets ``int(round((side - n) / 2.0))``, i.e. round-half-to-even),
3. ``convert("RGB")`` -- after the crop, in the image's original mode until then,
4. uint8 HWC -> CHW, cast to the default float dtype, divide by 255,
5. subtract the mean, then divide by the std (per channel, in that dtype).

Train (`TrainTransform`, `image_transform(n, train=True)`): random resized crop (area scale 0.9-1.0,
aspect ratio 3/4-4/3, bicubic) to ``n x n``, then steps 3-5. The randomness comes from a
`torch.Generator` owned by the transform (seeded, picklable, checkpointable) or, per sample, from
``key=`` so results do not depend on worker scheduling.

`load_image` decodes a path / bytes / file object; for JPEGs on the train path it can ask libjpeg to
decode at 1/2, 1/4 or 1/8 scale (`PIL.Image.Image.draft`) when the source is far larger than needed.
Never draft on the eval path: a drafted decode is not pixel-identical to decoding and then resizing.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from typing import IO, Union

import numpy as np
import torch
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

__all__ = [
    "DEFAULT_TRAIN_RATIO",
    "DEFAULT_TRAIN_SCALE",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "EvalTransform",
    "ImageSource",
    "TrainTransform",
    "center_crop",
    "center_crop_box",
    "image_transform",
    "load_image",
    "normalize",
    "preprocess_batch",
    "resize_shorter_side",
    "sample_crop_box",
    "shorter_side_size",
    "to_tensor",
]

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_TRAIN_SCALE: tuple[float, float] = (0.9, 1.0)  # OpenCLIP's default RandomResizedCrop area range
DEFAULT_TRAIN_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratio (w / h) range

_CROP_ATTEMPTS = 10  # rejection-sampling tries before the deterministic fallback crop

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Image.Image]


# ----------------------------------------------------------------------------------------------------
# Eval steps (each one a small public function so tests and other code can reuse them)
# ----------------------------------------------------------------------------------------------------


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
    """``normalize(to_tensor(image), mean, std)`` for an RGB image, computed in numpy.

    The same IEEE operations in the same order and precision (cast, / 255, - mean, / std), so the same
    bits, but without torch's intra-op thread pool, whose wake-ups dominate on 3 x 224 x 224 tensors.
    Falls back to the torch ops for default dtypes numpy does not share (float16, bfloat16).
    """
    dtype = torch.get_default_dtype()
    np_dtype = _NUMPY_FLOAT.get(dtype)
    if np_dtype is None or image.mode != "RGB":
        return normalize(to_tensor(image, dtype), mean, std)
    chw = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
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

    def load(self, source: ImageSource) -> Image.Image:
        """Decode ``source`` at full resolution (no draft: the eval path must stay exact)."""
        return load_image(source, None)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


# ----------------------------------------------------------------------------------------------------
# Train augmentation
# ----------------------------------------------------------------------------------------------------


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


class TrainTransform:
    """Random resized crop (bicubic) to ``image_size`` -> RGB -> tensor -> normalize (OpenCLIP's default).

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

    def __call__(self, image: Image.Image, *, key: int | None = None) -> torch.Tensor:
        image = _require_image(image)
        left, top, crop_w, crop_h = self.crop_box(image.width, image.height, key=key)
        image = image.crop((left, top, left + crop_w, top + crop_h))
        size = (self.image_size, self.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        image = image.convert("RGB")
        return _rgb_to_normalized(image, self.mean, self.std)

    def load(self, source: ImageSource) -> Image.Image:
        """Decode ``source``, letting a large JPEG decode at reduced scale (never below `min_source_side`)."""
        return load_image(source, self.min_source_side, margin=1.0)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"mean={self.mean}, std={self.std}, seed={self.seed})"
        )


def image_transform(
    image_size: int,
    train: bool = False,
    *,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    scale: Sequence[float] = DEFAULT_TRAIN_SCALE,
    ratio: Sequence[float] = DEFAULT_TRAIN_RATIO,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> EvalTransform | TrainTransform:
    """The preprocessing callable (PIL image -> float tensor [3, image_size, image_size]).

    ``train=False``: OpenAI's exact eval transform. ``train=True``: random resized crop augmentation,
    seeded by ``seed`` or driven by ``generator``.
    """
    if train:
        return TrainTransform(
            image_size, scale=scale, ratio=ratio, mean=mean, std=std, seed=seed, generator=generator
        )
    if seed is not None or generator is not None:
        raise ValueError("seed/generator only apply to the train transform; eval is not random")
    return EvalTransform(image_size, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------------
# Loading and batching
# ----------------------------------------------------------------------------------------------------

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
) -> Image.Image:
    """Open and fully decode an image from a path, bytes, a binary file object or an unloaded PIL image.

    With ``target_size`` (train path only) and ``draft=True``, a JPEG whose shorter side is at least
    twice ``ceil(target_size * margin)`` is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, never going
    below that side; other formats, and JPEGs not that large, decode normally. The mode is unchanged
    (RGB conversion belongs after the crop). The result is loaded, with no file handle left open.
    Pass ``target_size=None`` for the eval path: a drafted decode is close to, but not bit-identical
    with, a full decode followed by resizing.
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
            image = Image.open(fp)
        except UnidentifiedImageError as exc:
            raise UnidentifiedImageError(f"cannot identify image file {_describe(source)}") from exc
    if draft and target_size is not None:
        _maybe_draft(image, math.ceil(_check_size(target_size) * margin))
    image.load()
    return image


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
