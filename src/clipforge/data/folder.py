"""Folder source: every image under a folder (recursively), captioned by the same-name text file.

``photos/cat.jpg`` is captioned by ``photos/cat.txt``. Files are listed once, sorted by relative path, so
sample ``i`` is the same file on every machine. An image without its caption file is skipped and
counted at run time (like an empty caption), not rejected up front.
"""

from __future__ import annotations

import os

from clipforge.data.samples import RawSample


class FolderSource:
    """Map-style source: ``source[i]`` is the i-th image file (sorted) and its caption file."""

    def __init__(self, root: str, image_suffixes: tuple[str, ...], caption_suffix: str) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.path: image folder not found: {root}")
        self.root = root
        self.caption_suffix = caption_suffix.strip().lstrip(".")
        self.files = list_images(root, image_suffixes)
        if not self.files:
            wanted = ", ".join(f"*.{s}" for s in image_suffixes)
            raise ValueError(f"data.path: no images ({wanted}) under {root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> RawSample:
        image = self.files[index]
        caption_file = f"{os.path.splitext(image)[0]}.{self.caption_suffix}"
        try:
            with open(caption_file, "rb") as fh:
                caption: bytes | None = fh.read()
        except FileNotFoundError:
            caption = None
        return RawSample(image=image, caption=caption, key=os.path.relpath(image, self.root))

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, images={len(self)})"


def list_images(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """Paths of the files under ``root`` whose extension is in ``suffixes`` (any case), sorted."""
    wanted = {s.lower() for s in suffixes}
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            if os.path.splitext(name)[1].lstrip(".").lower() in wanted:
                found.append(os.path.join(folder, name))
    return sorted(found, key=lambda p: os.path.relpath(p, root))
