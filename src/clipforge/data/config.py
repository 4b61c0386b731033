"""The data section of a training config: which source, where it is, and how batches are made.

Every field is a plain value (str, int, float, bool, tuple of numbers) so a generic CLI mapper can
override it, e.g. ``--data.source csv --data.path train.tsv``. `DataConfig.validate` checks the values
alone; whether the files are really there is checked when the source is built (`build_train_loader`), and
for `clipforge train` before anything is written (`clipforge.train.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass

from clipforge.configs import invalid, require
from clipforge.transforms.loading import DEFAULT_MAX_IMAGE_PIXELS

SOURCES = ("synthetic", "webdataset", "csv", "folder")
CAPTIONS = ("all", "sample", "templates")  # data.captions

# Spellings of the tab separator that survive a shell and a CLI mapper.
_TAB_ALIASES = ("\t", "\\t", "tab", "TAB")


@dataclass
class DataConfig:
    source: str = "synthetic"  # one of SOURCES
    path: str = ""  # webdataset: shard spec with braces ("d/train-{000..008}.tar"); csv: a .csv/.tsv; folder
    # Samples per batch, the GLOBAL batch: with N processes each one gets batch_size / N of every batch
    # (a batch loses the samples that were skipped).
    batch_size: int = 128
    # Gradient cache: encode a batch this many samples at a time, for the same update at a fraction of the
    # activation memory (train/steps.py); 0 = the whole batch at once. A divisor of batch_size.
    micro_batch_size: int = 0
    workers: int = 0  # DataLoader worker processes; 0 = make batches in the training process
    prefetch: int = 2  # batches each worker prepares ahead (ignored with workers=0)
    pin_memory: bool = False  # page-lock batches so host-to-GPU copies can be asynchronous
    context_length: int = 77  # tokens per caption, SOT and EOT included (longer captions are truncated)
    augment: bool = True  # random resized crop for real images; False = OpenAI's eval resize + center crop
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop: range of the kept area fraction
    shuffle_buffer: int = 2000  # webdataset: samples shuffled across in a buffer; 0 = shard order only
    # webdataset: the independent shard streams whose chunks make every batch (data/streams.py). Fix it
    # (e.g. 8) to get the same batches on any number of processes; 0 = world size x max(1, workers), one
    # stream per worker: the batches then depend on both.
    shard_streams: int = 0
    # webdataset: each stream draws shards with replacement, forever (no epochs), for corpora larger than
    # the run will ever pass over.
    resampled: bool = False
    image_extensions: str = "jpg,jpeg,png,webp"  # webdataset keys / folder file suffixes that hold images
    caption_extension: str = "txt"  # webdataset key / folder file suffix that holds the caption
    # A caption text of several lines: "all" trains on the whole text, "sample" on one line per sample and
    # epoch, chosen reproducibly (for data with several captions per image, e.g. COCO's five).
    # "templates": no caption is read; each sample's class label fills a template (FLYP, data/labels.py).
    captions: str = "all"
    classes: str = ""  # captions = "templates": class names, a JSON file or a built-in set (as eval.classes)
    # captions = "templates": a template file, a built-in set or a literal with {}; "" = the classes' own
    # templates, else the bare class name (as eval.templates)
    templates: str = ""
    # captions = "templates": webdataset: the json field holding the label, or "cls" for a .cls member;
    # csv: the label column. A folder's labels are its class sub-folders.
    label_key: str = "label"
    csv_image_column: str = "filepath"  # csv: column with image paths (relative ones: to the CSV's folder)
    csv_caption_column: str = "caption"  # csv: column with the captions
    csv_separator: str = ""  # csv: one character; "" = tab for .tsv, comma otherwise ("tab" or "\t" work)
    synthetic_samples: int = 100_000  # synthetic: pictures per epoch (rendered on the fly, never stored)
    synthetic_seed: int = 0  # synthetic: picks the pictures themselves; the training seed only orders them
    synthetic_holdout: bool = True  # synthetic: keep the held-out colour-shape pairs out of training
    # Images whose header declares more pixels are skipped ("too_large") without being decoded; 0 = no
    # limit (Pillow still refuses over 179 MP). Training-time evaluation uses the same limit.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # 64 MP; see transforms/loading.py

    def validate(self, world_size: int = 1) -> DataConfig:
        """Raise ValueError (a `ConfigError`: `data.field = value: problem`) naming the first field whose
        value cannot work, on ``world_size`` processes; return self."""
        require(self.source in SOURCES, "data.source", self.source, f"must be one of {', '.join(SOURCES)}")
        require(
            self.source == "synthetic" or bool(self.path),
            "data.path",
            self.path,
            f"required for data.source = {self.source!r}",
        )
        _check_min("batch_size", self.batch_size, 1)
        _check_min("micro_batch_size", self.micro_batch_size, 0)
        require(
            self.micro_batch_size == 0 or self.batch_size % self.micro_batch_size == 0,
            "data.micro_batch_size",
            self.micro_batch_size,
            f"must be 0 (off) or a divisor of data.batch_size = {self.batch_size}",
        )
        _check_min("workers", self.workers, 0)
        _check_min("prefetch", self.prefetch, 1)
        _check_min("context_length", self.context_length, 2)
        _check_min("shuffle_buffer", self.shuffle_buffer, 0)
        _check_min("shard_streams", self.shard_streams, 0)
        _check_min("max_image_pixels", self.max_image_pixels, 0)
        lo, hi = (float(v) for v in self.crop_scale)
        require(
            0.0 < lo <= hi <= 1.0, "data.crop_scale", self.crop_scale, "must be (lo, hi), 0 < lo <= hi <= 1"
        )
        ext = self.image_extensions
        require(bool(self.image_suffixes()), "data.image_extensions", ext, "names no extension")
        require(
            self.captions in CAPTIONS, "data.captions", self.captions, f"must be one of {', '.join(CAPTIONS)}"
        )
        if self.captions == "templates":
            self._check_templated()
        cap = self.caption_extension
        require(bool(cap.strip(". ")), "data.caption_extension", cap, "names no extension")
        if self.source == "csv":
            self.separator()  # raises on a bad value
        if self.source == "synthetic":
            n = self.synthetic_samples
            require(
                n >= self.batch_size,
                "data.synthetic_samples",
                n,
                f"fewer than data.batch_size = {self.batch_size}",
            )
        self._check_world(world_size)
        return self

    def _check_templated(self) -> None:
        """Captions from labels need labelled data and the class names (the files are checked later)."""
        require(
            self.source != "synthetic",
            "data.captions",
            self.captions,
            "needs labelled data: data.source = 'webdataset', 'csv' or 'folder'",
        )
        require(bool(self.classes), "data.classes", self.classes, "required with data.captions = 'templates'")
        require(
            self.source == "folder" or bool(self.label_key.strip()),
            "data.label_key",
            self.label_key,
            f"required with data.captions = 'templates' and data.source = {self.source!r}",
        )

    def streams(self, world_size: int = 1) -> int:
        """The number of shard streams: ``shard_streams``, or one per worker of every process when 0."""
        return self.shard_streams or world_size * max(1, self.workers)

    def _check_world(self, world_size: int) -> None:
        """The batch splits evenly over the processes, and each process's workers get whole streams."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be an int >= 1, got {world_size!r}")
        require(
            self.batch_size % world_size == 0,
            "data.batch_size",
            self.batch_size,
            f"not divisible by the world size {world_size}: it is the global batch, split evenly over "
            "the processes",
        )
        if self.source != "webdataset":
            return
        streams, workers = self.streams(world_size), max(1, self.workers)
        what = f"{streams} streams" + ("" if self.shard_streams else " (0 = one per worker of every process)")
        require(
            streams % world_size == 0,
            "data.shard_streams",
            self.shard_streams,
            f"{what}, not a multiple of the world size {world_size}: each process reads whole streams",
        )
        require(
            streams // world_size >= workers,
            "data.shard_streams",
            self.shard_streams,
            f"{what}, {streams // world_size} per process on {world_size} process(es), fewer than "
            f"data.workers = {self.workers}: each worker reads whole streams (use a multiple of "
            f"{world_size * workers})",
        )
        require(
            streams <= self.batch_size,
            "data.shard_streams",
            self.shard_streams,
            f"{what}, more than data.batch_size = {self.batch_size}: each stream gives every batch at "
            "least one sample",
        )

    def image_suffixes(self) -> tuple[str, ...]:
        """``image_extensions`` as lower-case suffixes without dots: ("jpg", "jpeg", ...)."""
        parts = (part.strip().lstrip(".").lower() for part in self.image_extensions.split(","))
        return tuple(part for part in parts if part)

    def separator(self) -> str:
        """The CSV separator: ``csv_separator``, or by the file's extension when it is empty."""
        if self.csv_separator in _TAB_ALIASES:
            return "\t"
        if self.csv_separator:
            if len(self.csv_separator) != 1:
                raise invalid("data.csv_separator", self.csv_separator, "must be one character or 'tab'")
            return self.csv_separator
        return "\t" if self.path.lower().endswith(".tsv") else ","


def _check_min(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(f"data.{name}", value, f"must be an int >= {minimum}")
