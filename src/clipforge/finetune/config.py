"""The configuration of `clipforge finetune`: classification fine-tuning from a zero-shot head.

A recipe is a TOML file of these fields (the run's scalars at the top, the labelled sets in `[data]`);
`clipforge finetune RECIPE --lr 1e-5 --data.train shards/` overrides any of them (`configs.apply_overrides`),
and the resolved config is written to the output directory as config.toml (`configs.dump_toml`).

Values are checked when the config is made, the required fields by `check_complete`; what needs the file
system or the model (paths, class files, the weights) is checked by `finetune.classify.prepare` before
anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from clipforge.configs import require


@dataclass
class FinetuneData:
    train: str = ""  # the labelled training set: tar shards, a class-folder tree or a CSV
    eval: str = ""  # optional held-out labelled set (same format and keys); its accuracy is reported
    classes: str = ""  # class names: a JSON file or a built-in set (cifar10, ...)
    templates: str = ""  # template file, built-in set or literal with {} ("" = the classes' own, else "{}")
    format: Literal["auto", "webdataset", "folder", "csv"] = "auto"
    label_key: str = "label"  # json field (or "cls") of a tar sample, or CSV column, holding the label
    image_key: str = "filepath"  # CSV: the image-path column
    max_samples: int = 0  # use at most this many samples of each set (0: all)
    workers: int = 2  # image-decoding processes (0: decode in the main process)

    def __post_init__(self) -> None:
        require(bool(self.label_key), "data.label_key", self.label_key, "must name a label field")
        require(self.max_samples >= 0, "data.max_samples", self.max_samples, "must be >= 0 (0: all)")
        require(self.workers >= 0, "data.workers", self.workers, "must be >= 0")


@dataclass
class FinetuneConfig:
    model: str = ""  # the zero-shot model: a release name, a clipforge directory or a checkpoint file
    out_dir: str = ""  # model/, config.toml, metrics.jsonl (and head.safetensors, classes.json) go here
    # "frozen": the zero-shot head stays fixed and only the image tower trains, so the result is a plain
    # CLIP model for `clipforge eval zeroshot`, `merge` and `eval sweep`; "trainable": the head trains too.
    head: Literal["frozen", "trainable"] = "frozen"
    batch_size: int = 32
    steps: int = 1000  # optimizer steps
    lr: float = 1e-5  # peak learning rate, reached at the end of warmup, then cosine decay to 0
    warmup_steps: int = 100
    weight_decay: float = 0.1  # decoupled (AdamW), on weights only
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast; weights and optimizer stay fp32
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    log_every: int = 10  # steps between metric lines
    data: FinetuneData = field(default_factory=FinetuneData)

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        require(self.steps >= 1, "steps", self.steps, "must be at least 1")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be a finite number > 0")
        require(
            0 <= self.warmup_steps <= self.steps, "warmup_steps", self.warmup_steps, "must be in [0, steps]"
        )
        wd = self.weight_decay
        require(math.isfinite(wd) and wd >= 0, "weight_decay", wd, "must be a finite number >= 0")
        require(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")
        require(bool(self.device.strip()), "device", self.device, "names no device")
        require(self.log_every >= 1, "log_every", self.log_every, "must be at least 1")

    def check_complete(self) -> None:
        """The fields without a usable default are set (checked after the overrides, which may set them)."""
        require(bool(self.model.strip()), "model", self.model, "names no model")
        require(bool(self.out_dir.strip()), "out_dir", self.out_dir, "names no directory")
        require(bool(self.data.train.strip()), "data.train", self.data.train, "names no labelled set")
        require(bool(self.data.classes.strip()), "data.classes", self.data.classes, "names no class set")
