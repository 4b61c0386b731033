"""Folder source: every image under a folder (recursively), captioned by the same-name text file.

``photos/cat.jpg`` is captioned by ``photos/cat.txt``. Files are listed once, sorted by relative path, so
sample ``i`` is the same file on every machine. An image without its caption file is skipped and
counted at run time (like an empty caption), not rejected up front.

With ``data.captions = "templates"`` the folder is a class tree instead: ``photos/cat/01.jpg`` is labelled
``cat`` (its first sub-folder) and no caption file is read; an image directly under the root has no label.
"""

from __future__ import annotations

import os

from clipforge.data.samples import RawSample


class FolderSource:
    """Map-style source: ``source[i]`` is the i-th image file (sorted) and its caption file."""

    def __init__(
        self, root: str, image_suffixes: tuple[str, ...], caption_suffix: str, labelled: bool = False
    ) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.path: image folder not found: {root}")
        self.root = root
        self.caption_suffix = caption_suffix.strip().lstrip(".")
        self.labelled = labelled  # data.captions = "templates": the class sub-folder is the label
        self.files = list_images(root, image_suffixes)
        if not self.files:
            wanted = ", ".join(f"*.{s}" for s in image_suffixes)
            raise ValueError(f"data.path: no images ({wanted}) under {root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> RawSample:
        image = self.files[index]
        if self.labelled:
            relative = os.path.relpath(image, self.root)
            return RawSample(image=image, caption=None, key=relative, label=class_folder(relative))
        caption_file = f"{os.path.splitext(image)[0]}.{self.caption_suffix}"
        try:
            with open(caption_file, "rb") as fh:
                caption: bytes | None = fh.read()
        except FileNotFoundError:
            caption = None
        return RawSample(image=image, caption=caption, key=os.path.relpath(image, self.root))

    @property
    def class_folders(self) -> set[str]:
        """The top-level sub-folders that hold images: a class tree's class names (or ids)."""
        found = (class_folder(os.path.relpath(image, self.root)) for image in self.files)
        return {folder for folder in found if folder is not None}

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, images={len(self)})"


def class_folder(relative: str) -> str | None:
    """The first folder of a path relative to the root (``cat/01.jpg`` -> ``cat``); None at the top."""
    head, sep, _ = relative.replace(os.sep, "/").partition("/")
    return head if sep else None


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
