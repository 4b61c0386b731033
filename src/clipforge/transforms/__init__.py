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

from collections.abc import Sequence

import torch

from .augment import DEFAULT_TRAIN_RATIO, DEFAULT_TRAIN_SCALE, TrainTransform, sample_crop_box
from .exact import (
    OPENAI_MEAN,
    OPENAI_STD,
    EvalTransform,
    center_crop,
    center_crop_box,
    normalize,
    resize_shorter_side,
    shorter_side_size,
    to_tensor,
)
from .loading import ImageSource, load_image, preprocess_batch

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
