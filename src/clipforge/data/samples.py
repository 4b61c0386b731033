"""What every source hands the pipeline: one undecoded sample, the ways it can be bad, and seeds.

Sources only find data; they never decode it. A `RawSample` holds an image still encoded (a path or the
bytes from a tar) or already drawn (a PIL image, for the synthetic source) and a caption that may be
missing. The pipeline decodes it in a worker, and a sample that cannot be used raises `Skip` with one of
`SKIP_REASONS`, which the batch then counts instead of crashing the run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from clipforge.transforms import ImageSource
from clipforge.transforms.loading import ImageTooLarge

MISSING_IMAGE = "missing_image"  # no image in the sample, or its file is gone
CORRUPT_IMAGE = "corrupt_image"  # the image bytes do not decode (or the transform rejects the image)
MISSING_CAPTION = "missing_caption"  # no caption, or one that is empty after stripping whitespace
UNREADABLE_SHARD = "unreadable_shard"  # a tar shard failed to open or broke mid-way (counts events)
TOO_LARGE = "too_large"  # the image header declares more pixels than data.max_image_pixels (not decoded)
UNKNOWN_LABEL = "unknown_label"  # data.captions = "templates": no label, or one not among data.classes

SKIP_REASONS: tuple[str, ...] = (
    MISSING_IMAGE,
    CORRUPT_IMAGE,
    MISSING_CAPTION,
    UNREADABLE_SHARD,
    TOO_LARGE,
    UNKNOWN_LABEL,
)


@dataclass
class RawSample:
    image: ImageSource | None  # a path, encoded bytes, or a drawn PIL image; None = the sample has none
    caption: str | bytes | None  # bytes are decoded as UTF-8; None = the sample has none
    key: str  # names the sample in messages; streamed sources also seed its augmentation with it
    # data.captions = "templates": the class label (a name, an index, or its decimal text); None = none
    label: str | int | None = None


class Skip(Exception):
    """A sample that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def image_skip(exc: Exception) -> Skip:
    """The `Skip` for an image that failed to load: missing file, over the pixel limit, or corrupt."""
    if isinstance(exc, FileNotFoundError):
        return Skip(MISSING_IMAGE, str(exc))
    if isinstance(exc, ImageTooLarge):
        return Skip(TOO_LARGE, str(exc))
    return Skip(CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")  # PIL raises many types for broken files


def read_caption(caption: str | bytes | None) -> str:
    """The caption as clean text (UTF-8, surrounding whitespace stripped); Skip when missing or empty."""
    if isinstance(caption, (bytes, bytearray)):
        caption = bytes(caption).decode("utf-8", errors="replace")
    if caption is None or not caption.strip():
        raise Skip(MISSING_CAPTION)
    return caption.strip()


CAPTION_CHOICES = ("all", "sample")


def choose_caption(text: str, key: int, choice: str = "all") -> str:
    """The caption to train on, for a sample whose text may hold several captions, one per line.

    "all": the whole text (the lines join into one caption: the tokenizer's cleaning turns newlines into
    spaces). "sample": one non-empty line, picked by ``key`` (the sample's per-epoch augmentation key), so
    each epoch may see a different caption of the same image, reproducibly and whatever the worker.
    """
    if choice == "all" or "\n" not in text:
        return text
    if choice != "sample":
        raise ValueError(f"caption choice must be one of {CAPTION_CHOICES}, got {choice!r}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[derive_seed("caption", key) % len(lines)]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part and their order, identical in every process and run.

    Used for each random choice that must be reproducible: ``derive_seed(seed, "order", epoch)`` and so
    on. Python's ``hash`` is salted per process, so a cryptographic hash of the parts' text is used.
    """
    text = "\x1f".join(str(part) for part in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
