"""Everything a training run needs, checked before anything is written.

The config's values are checked when it is made (`train/config.py`, `DataConfig.validate`); this module
checks what they point at: the device, the model (`validate_model`: the architecture name, the tokenizer
and the starting weights), the data and evaluation files, the run directory and the checkpoint to resume.
Each check is cheap: file kinds and headers, at most a batch's worth of shard samples counted, and the lists
a run makes at its start anyway (a CSV's rows, a folder's images, the evaluation set's labels), made once
more. The first problem raises a `ConfigError` of one line, `field = value: what is wrong`. `train()` calls
`validate_run` before it creates the run directory.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import torch

from clipforge.checkpoints import native
from clipforge.configs import ConfigError, invalid
from clipforge.data.config import DataConfig
from clipforge.data.labels import first_shard_labels
from clipforge.data.sources import Source, build_source, source_labels
from clipforge.data.webdataset import ShardSource, count_samples, is_local, local_path
from clipforge.distributed.fsdp import METADATA_FILE
from clipforge.distributed.world import World
from clipforge.evaluate.datasets import DataSpec, read_labelled
from clipforge.evaluate.prompts import load_prompts, load_templates
from clipforge.models import CLIPConfig
from clipforge.train.checkpointing import OPTIMIZER_FILE, SHARDED_DIR, STATE_FILE, list_checkpoints
from clipforge.train.config import TrainConfig
from clipforge.train.evaluation import eval_set
from clipforge.train.model import model_config, temperature_settings
from clipforge.train.validate_model import (
    check_freeze_batchnorm,
    check_image_size,
    check_model_name,
    check_pretrained,
    check_tokenizer,
    check_unlocked_blocks,
    check_weights_fit,
    native_config,
)


def validate_run(cfg: TrainConfig, resume: str = "") -> None:
    """Raise `ConfigError` naming the first field of `cfg` (or `--resume`) that cannot work; write nothing."""
    world = check_world()
    cfg.data.validate(world.world_size)
    try:
        temperature_settings(cfg.loss)
    except ValueError as e:
        raise invalid("loss.init_temperature", cfg.loss.init_temperature, str(e)) from None
    check_device(cfg.run.device, cfg.run.precision)
    architecture = check_model_name(cfg)
    check_image_size(cfg.model.image_size, architecture)
    check_unlocked_blocks(cfg, architecture)
    check_freeze_batchnorm(cfg.model.freeze_batchnorm, architecture)
    trained = model_config(cfg, check_tokenizer(cfg.model.tokenizer))
    check_pretrained(cfg.model.pretrained, trained)
    check_data(cfg.data, trained.vision.image_size, cfg.run.seed, world.world_size)
    check_eval(cfg)
    check_out_dir(cfg.run.out_dir)
    check_resume(cfg, resume, trained, world.world_size)


def check_world() -> World:
    """This process's place in the run, from torchrun's or SLURM's variables."""
    try:
        return World.from_env()
    except ValueError as e:
        raise ConfigError(f"the launcher's environment: {e}") from None


def check_device(device: str, precision: str) -> None:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise invalid("run.device", device, "not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise invalid("run.device", device, "CUDA is not available to this torch build on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise invalid("run.device", device, f"this machine has {count} CUDA device(s)")
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise invalid("run.precision", precision, f"the GPU of {device} has no bfloat16 support")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise invalid("run.device", device, "MPS is not available to this torch build on this machine")
    elif parsed.type != "cpu":
        raise invalid("run.device", device, "unsupported device type: use 'auto', 'cpu' or 'cuda'")


def check_data(data: DataConfig, image_size: int, seed: int, world_size: int = 1) -> None:
    """The files exist and are of the right kind, and hold at least one batch (CSV rows, folder images,
    local shards' samples: counted until a batch is reached); shards enough for the run's streams."""
    if data.source == "synthetic":
        return  # `DataConfig.validate` compared synthetic_samples with the batch size
    if data.source == "webdataset":
        check_shards("data.path", data.path)
    else:
        want_dir = data.source == "folder"
        _check_kind("data.path", data.path, want_dir, "an image folder" if want_dir else "a CSV/TSV file")
    try:
        source = build_source(data, image_size, seed, world_size)  # header, columns, first images, shards
    except (OSError, ValueError) as e:
        # The sources name the field at fault, as "data.<field>: problem".
        field, _, problem = str(e).partition(": ")
        name = field.removeprefix("data.")
        if not (field.startswith("data.") and hasattr(data, name)):
            field, name, problem = "data.path", "path", str(e).removeprefix("data.path ")
        raise invalid(field, getattr(data, name), problem) from None
    check_labels(data, source)
    if data.source == "webdataset":
        samples = _count_shard_samples(source.urls, data.batch_size)
    else:
        samples = len(source)
    if samples is not None and samples < data.batch_size:
        raise invalid(
            "data.batch_size", data.batch_size, f"larger than the data: {data.path} holds {samples} samples"
        )


def check_labels(data: DataConfig, source: Source) -> None:
    """`data.captions = "templates"`: the classes and templates load; a CSV's or folder's labels name at
    least one class (else every sample would be skipped); the first local shard's samples carry a label
    under `data.label_key` (a CSV's label column is checked by its source)."""
    if data.captions != "templates":
        return
    try:
        captions = source_labels(data, source)
    except ValueError as e:  # "data.classes: problem" or "data.templates: problem"
        field, _, problem = str(e).partition(": ")
        raise invalid(field, getattr(data, field.removeprefix("data.")), problem) from None
    assert captions is not None
    if isinstance(source, ShardSource):
        _check_shard_labels(data, source)
        return
    found = {str(label) for i in range(len(source)) if (label := source[i].label) is not None}
    if not found:
        what = "class sub-folders" if data.source == "folder" else f"labels in column {data.label_key!r}"
        raise invalid("data.path", data.path, f"holds no {what}")
    if not any(captions.knows(label) for label in found):
        example = sorted(found)[0]
        raise invalid(
            "data.classes", data.classes, f"names none of the labels in {data.path}, e.g. {example!r}"
        )


def _check_shard_labels(data: DataConfig, source: ShardSource) -> None:
    """The first local shard's first samples carry a label (the rest is only known when read)."""
    local = [local_path(url) for url in source.urls if is_local(url)]
    if not local:
        return
    try:
        labels = first_shard_labels(local[0], data.label_key)
    except (OSError, tarfile.TarError) as e:
        raise invalid("data.path", local[0], f"unreadable shard: {e}") from None
    if labels and all(label is None for label in labels):
        where = "a .cls member" if data.label_key == "cls" else f"a json field {data.label_key!r}"
        raise invalid(
            "data.label_key",
            data.label_key,
            f"none of the first {len(labels)} samples of {local[0]} has {where}",
        )


def check_shards(field: str, spec: str) -> list[str]:
    """The shard list of a brace spec; each local shard must be a file."""
    from webdataset.shardlists import expand_urls

    try:
        urls = expand_urls(spec)
    except ValueError as e:
        raise invalid(field, spec, f"not a shard spec: {e}") from None
    if not urls:
        raise invalid(field, spec, "names no shards")
    local = [local_path(url) for url in urls if is_local(url)]
    directories = [path for path in local if os.path.isdir(path)]
    if directories:
        raise invalid(field, spec, f"{directories[0]} is a directory, not a .tar shard")
    missing = [path for path in local if not os.path.isfile(path)]
    if missing:
        raise invalid(field, spec, f"{len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]}")
    return urls


def _count_shard_samples(urls: list[str], enough: int) -> int | None:
    """Samples in the shards, counted shard by shard until `enough` (tar headers only); None if remote."""
    if not all(is_local(url) for url in urls):
        return None
    total = 0
    for url in urls:
        try:
            total += count_samples(local_path(url))
        except (OSError, tarfile.TarError) as e:
            raise invalid("data.path", url, f"unreadable shard: {e}") from None
        if total >= enough:
            break
    return total


def _check_kind(field: str, path: str, want_dir: bool, what: str) -> None:
    if not os.path.exists(path):
        raise invalid(field, path, f"no such {'directory' if want_dir else 'file'}; expected {what}")
    if os.path.isdir(path) != want_dir:
        raise invalid(field, path, f"is a {'file' if want_dir else 'directory'}; expected {what}")


def check_eval(cfg: TrainConfig) -> None:
    """The labelled set, its classes and the templates, when training evaluates on them."""
    which, e = eval_set(cfg), cfg.eval
    if not which:
        return
    if e.templates:
        try:
            load_templates(e.templates)
        except FileNotFoundError:
            what = "not a template file, a built-in set name or a literal with {}"
            raise invalid("eval.templates", e.templates, what) from None
        except (OSError, ValueError) as err:
            raise invalid("eval.templates", e.templates, str(err)) from None
    if which == "synthetic":
        return
    spec = DataSpec(e.data, label_key=e.label_key, max_samples=e.max_samples)
    if spec.resolved_format() == "webdataset":
        check_shards("eval.data", e.data)
    elif not os.path.exists(e.data):
        raise invalid("eval.data", e.data, "no such file or directory")
    if not e.classes:
        raise invalid(
            "eval.classes", e.classes, "required with a labelled eval.data: a JSON file or a set name"
        )
    if os.path.isdir(e.classes):
        raise invalid(
            "eval.classes", e.classes, "is a directory; expected a JSON file of class names or a set name"
        )
    try:
        prompts = load_prompts(e.classes)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise invalid("eval.classes", e.classes, str(err)) from None
    try:
        read_labelled(spec, prompts.classnames)  # the image list and labels only, as the run reads them
    except (OSError, ValueError, tarfile.TarError) as err:
        raise invalid("eval.data", e.data, str(err)) from None


def check_out_dir(out_dir: str) -> None:
    """The run directory exists and is writable, or can be made (its nearest existing parent is a
    writable directory); nothing is created here."""
    path = Path(out_dir).absolute()
    if path.exists():
        if not path.is_dir():
            raise invalid("run.out_dir", out_dir, "is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise invalid("run.out_dir", out_dir, "is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise invalid("run.out_dir", out_dir, f"cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise invalid("run.out_dir", out_dir, f"cannot be created: {parent} is not writable")


def check_resume(cfg: TrainConfig, resume: str, trained: CLIPConfig, world_size: int = 1) -> None:
    """`--resume PATH` is a whole training checkpoint of this model; `latest` may find none (a fresh run).
    A sharded run's checkpoint resumes anywhere; a replicated one's not into several sharded processes."""
    if not resume:
        return
    if resume == "latest":
        found = list_checkpoints(Path(cfg.run.out_dir))
        if not found:
            return
        path = found[-1]
    else:
        path = Path(resume)
        if not path.is_dir():
            what = "is a file" if path.exists() else "no such directory"
            raise invalid(
                "--resume", resume, f"{what}; expected a checkpoint directory (RUN_DIR/step-NNNNNNNN)"
            )
    sharded = (path / SHARDED_DIR).is_dir()
    optimizer = f"{SHARDED_DIR}/{METADATA_FILE}" if sharded else OPTIMIZER_FILE
    for name in (STATE_FILE, optimizer, native.CONFIG_FILE, native.WEIGHTS_FILE):
        if not (path / name).is_file():
            raise invalid("--resume", resume, f"not a training checkpoint: {path} holds no {name}")
    if not sharded and cfg.run.strategy == "fsdp" and world_size > 1:
        raise invalid(
            "run.strategy",
            "fsdp",
            f"the checkpoint --resume {resume} was written by a replicated run; resume it with "
            "run.strategy = 'ddp' (on any number of processes) or in one process",
        )
    try:
        saved = json.loads((path / STATE_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise invalid("--resume", resume, f"unreadable {STATE_FILE}: {e}") from None
    _check_same("model.name", saved, cfg.model.name, resume)
    _check_same("loss.name", saved, cfg.loss.name, resume)
    _check_same("data.context_length", saved, cfg.data.context_length, resume)
    # The optimizer's groups and their lr scales are the checkpoint's: these must not change on resume.
    for field in ("model.image_size", "optim.layer_decay", *UNLOCKED_BLOCKS):
        _check_same(field, saved, _value_of(cfg, field), resume)
    check_weights_fit("--resume", resume, native_config("--resume", str(path)), trained)


UNLOCKED_BLOCKS = ("model.lock_image_unlocked_blocks", "model.lock_text_unlocked_blocks")


def _value_of(cfg: TrainConfig, field: str) -> object:
    section, name = field.split(".")
    return getattr(getattr(cfg, section), name)


def _check_same(field: str, saved: dict, value: object, resume: str) -> None:
    section, name = field.split(".")
    before = saved.get(section, {}).get(name, value)
    if before != value:
        raise invalid(field, value, f"the checkpoint --resume {resume} was trained with {field} = {before!r}")
