"""CSV / TSV source: one row per sample, an image-path column and a caption column (named in a header).

Relative image paths are relative to the CSV file's folder, so a dataset folder can move as a whole.
The whole table is read once, at construction; a missing file or column is an error then, not mid-run.
With ``data.captions = "templates"`` the column ``data.label_key`` holds each row's class label instead.
"""

from __future__ import annotations

import csv
import os

from clipforge.data.samples import RawSample

_SPOT_CHECK = 8  # image paths checked up front: catches a wrong root before training, costs 8 stats


class TableSource:
    """Map-style source: ``source[i]`` is row ``i`` (after the header) as a `RawSample`."""

    def __init__(
        self, path: str, image_column: str, caption_column: str, separator: str, label_column: str = ""
    ) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.path: CSV/TSV file not found: {path}")
        self.path = path
        root = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter=separator)
            header = next(reader, [])
            image_at = _column(header, image_column, "csv_image_column", path, separator)
            # data.captions = "templates": the label column is read in place of the caption column.
            self.labelled = bool(label_column)
            if self.labelled:
                caption_at = _column(header, label_column, "label_key", path, separator)
            else:
                caption_at = _column(header, caption_column, "csv_caption_column", path, separator)
            self.images: list[str | None] = []
            self.captions: list[str | None] = []
            for row in reader:
                if not row:
                    continue  # a blank line is not a sample
                image = _cell(row, image_at)
                self.images.append(os.path.join(root, image) if image else None)
                self.captions.append(_cell(row, caption_at))
        if not self.images:
            raise ValueError(f"data.path: {path} has a header but no rows")
        _spot_check(self.images, path)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> RawSample:
        key = f"row {index + 2}"
        if self.labelled:
            return RawSample(image=self.images[index], caption=None, key=key, label=self.captions[index])
        return RawSample(image=self.images[index], caption=self.captions[index], key=key)

    def __repr__(self) -> str:
        return f"TableSource({self.path!r}, rows={len(self)})"


def _column(header: list[str], name: str, field: str, path: str, separator: str) -> int:
    names = [h.strip() for h in header]
    if name not in names:
        raise ValueError(
            f"data.{field}: no column {name!r} in {path}; its header is {names} "
            f"(read with separator {separator!r}; see data.csv_separator)"
        )
    return names.index(name)


def _cell(row: list[str], at: int) -> str | None:
    return row[at].strip() if at < len(row) and row[at].strip() else None


def _spot_check(images: list[str | None], path: str) -> None:
    """Fail early when none of the first few image paths exists: the paths' root is probably wrong."""
    first = [image for image in images[: 4 * _SPOT_CHECK] if image][:_SPOT_CHECK]
    if first and not any(os.path.isfile(image) for image in first):
        raise FileNotFoundError(
            f"data.path: none of the first {len(first)} images listed in {path} exists, e.g. {first[0]} "
            "(relative paths are read from the CSV's own folder)"
        )
