"""Images of an evaluation set: where each one's bytes are, and decoding them without ever stopping a worker.

An `ImageRef` is a whole file or a member of an uncompressed tar read at its byte offset, so a set is listed
without decoding anything; `ImageDataset` decodes with OpenAI's exact eval transform in DataLoader workers,
and marks an image it cannot use instead of raising (`problem` says why, in the main process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clipforge.data.samples import Skip, image_skip
from clipforge.transforms import EvalTransform


@dataclass(frozen=True)
class ImageRef:
    """An encoded image: a whole file (`size` -1) or `size` bytes at `offset` in an uncompressed tar."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self) -> str:
        return self.path if self.size < 0 else f"{self.path}@{self.offset}"


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of decoded, eval-transformed images: item i is (image i, True), or
    (zeros, False) when image i cannot be used -- a missing file, bytes that do not decode, or more
    than `max_pixels` pixels (None: the default limit). A bad image never stops a DataLoader worker."""

    def __init__(self, images: Sequence[ImageRef], transform: EvalTransform, max_pixels: int | None = None):
        self.images = list(images)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def decode(self, index: int) -> torch.Tensor:
        """Image `index`, transformed; raises when it cannot be used."""
        return self.transform(self.transform.load(self.images[index].read(), self.max_pixels))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.decode(index), True
        except Exception:  # why is found again by `problem`, in the main process, for the few bad ones
            size = self.transform.image_size
            return torch.zeros(3, size, size), False

    def problem(self, index: int) -> Skip | None:
        """Why image `index` cannot be used (a `Skip` with a reason of data.samples), or None."""
        try:
            self.decode(index)
        except Exception as exc:
            return image_skip(exc)
        return None
