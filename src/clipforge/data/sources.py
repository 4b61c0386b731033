"""Which source a data config names, built and checked: synthetic pictures, a CSV table, a folder tree or
webdataset shards. Map-style sources give random access by index; shards are streamed."""

from __future__ import annotations

from typing import Protocol

from clipforge.data.config import DataConfig
from clipforge.data.folder import FolderSource
from clipforge.data.labels import ClassCaptions, class_captions
from clipforge.data.samples import RawSample
from clipforge.data.synthetic import SyntheticSource
from clipforge.data.table import TableSource
from clipforge.data.webdataset import ShardSource


class MapSource(Protocol):
    """A source with random access: synthetic, csv, folder."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> RawSample: ...


Source = MapSource | ShardSource


def source_labels(cfg: DataConfig, source: Source) -> ClassCaptions | None:
    """With ``data.captions = "templates"``: the class names and templates that caption the samples."""
    if cfg.captions != "templates":
        return None
    folders = source.class_folders if isinstance(source, FolderSource) else ()
    return class_captions(cfg.classes, cfg.templates, folders)


def build_source(cfg: DataConfig, image_size: int, seed: int, world_size: int = 1) -> Source:
    """The source ``cfg.source`` names, its files checked (webdataset: enough shards for its streams)."""
    labelled = cfg.captions == "templates"  # the sources hand over labels instead of captions
    if cfg.source == "synthetic":
        return SyntheticSource(image_size, cfg.synthetic_samples, cfg.synthetic_seed, cfg.synthetic_holdout)
    if cfg.source == "csv":
        label_column = cfg.label_key if labelled else ""
        return TableSource(
            cfg.path, cfg.csv_image_column, cfg.csv_caption_column, cfg.separator(), label_column
        )
    if cfg.source == "folder":
        return FolderSource(cfg.path, cfg.image_suffixes(), cfg.caption_extension, labelled)
    if cfg.source == "webdataset":
        source = ShardSource(
            cfg.path,
            cfg.image_suffixes(),
            cfg.caption_extension,
            cfg.shuffle_buffer,
            seed,
            cfg.resampled,
            cfg.label_key if labelled else "",
        )
        streams = cfg.streams(world_size)
        if len(source.urls) < streams and not cfg.resampled:  # a resampled stream may draw any shard
            how = "data.shard_streams" if cfg.shard_streams else f"world size {world_size} x data.workers"
            raise ValueError(
                f"data.path names {len(source.urls)} shard(s), fewer than its {streams} shard streams "
                f"({how}={cfg.shard_streams or cfg.workers}): each stream reads whole shards, so use "
                "fewer streams (or workers) or more shards"
            )
        return source
    raise ValueError(f"unknown data.source {cfg.source!r}")
