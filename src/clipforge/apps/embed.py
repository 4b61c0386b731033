"""Embed a collection: every image (or text) of a source as an L2-normalized vector, in resumable parts.

The source is listed once, without decoding: a folder of images (captions from same-name .txt files),
uncompressed tar shards (webdataset layout: the image member, the caption in `caption_key`), a CSV/TSV
(an image-path column and an optional caption column), or a text file (one text a line). Item i of the
listing is part i // part_size; a part is embedded in batches that never cross it, so its vectors are the
same whichever run or process makes it. Images decode in DataLoader workers with OpenAI's exact eval
transform; one that cannot be used is counted by reason and left out, never fatal.

Resumption: parts already in the directory are skipped, so a killed run continues where it stopped, with
no duplicates and no gaps (embeddings.py: each part is written atomically). Processes: under torchrun
(or SLURM) rank r of W embeds the parts p with p % W == r; no process group is needed. The directory's
format is described in `clipforge.apps.embeddings`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipforge.apps import embeddings as store
from clipforge.data.samples import MISSING_IMAGE
from clipforge.distributed.world import World
from clipforge.evaluate.datasets import DataSpec
from clipforge.evaluate.images import ImageDataset, ImageRef
from clipforge.transforms import EvalTransform


@dataclass
class EmbedConfig:
    """What to embed, with which model, and where the parts go (the flags of `clipforge embed`)."""

    model: str  # anything clipforge.load takes; recorded as given
    out: str  # the embeddings directory
    images: str = ""  # a folder, tar shards ("train-{000..008}.tar") or a CSV/TSV
    texts: str = ""  # or: a text file, one text a line
    format: str = "auto"  # auto | folder | webdataset | csv
    caption_key: str = "txt"  # shards: caption member ("txt", "json:FIELD"); folder: suffix; csv: column
    image_key: str = "filepath"  # csv: the image-path column
    dtype: str = "float16"  # how vectors are stored: float16 (half the space) or float32
    batch_size: int = 256
    workers: int = 2  # image-decoding processes (0: decode in this process)
    part_size: int = 10_000  # items per part: the unit of resumption and of work per process
    int8: bool = False  # encode with the int8 inference copy (docs/int8.md)
    device: str = "cpu"
    max_image_pixels: int | None = None  # larger images are left out undecoded (None: the default limit)


@dataclass
class Item:
    """One entry of the listing: an image (`ref`, None when the sample has none) or a text (`caption`)."""

    path: str  # a file path, a shard key, or "" for a text
    caption: str = ""
    ref: ImageRef | None = None


@dataclass
class EmbedResult:
    out_dir: str
    parts_total: int
    parts_done: int  # in the directory now, by any process
    parts_written: int  # by this process in this run
    items_now: int  # items of the parts written by this process in this run
    seconds: float
    count: int  # vectors in the directory
    skipped: dict[str, int] = field(default_factory=dict)  # items left out, by reason, in the directory


def validate(config: EmbedConfig) -> None:
    """Refuse a bad configuration with one line, before anything is read or written."""
    if bool(config.images) == bool(config.texts):
        raise ValueError("give exactly one of --images and --texts")
    if config.dtype not in store.DTYPES:
        raise ValueError(f"--dtype must be one of {store.DTYPES}, got {config.dtype!r}")
    for name in ("batch_size", "part_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.workers < 0 or (config.max_image_pixels or 0) < 0:
        raise ValueError("--workers and --max-image-pixels must be >= 0")
    if config.format not in ("auto", "folder", "webdataset", "csv"):
        raise ValueError(f"unknown --format {config.format!r}")


def list_items(config: EmbedConfig) -> list[Item]:
    """The source's items in a fixed order (sorted files, shard order, CSV rows, text lines)."""
    if config.texts:
        with open(config.texts, encoding="utf-8") as f:
            items = [Item("", line.strip()) for line in f if line.strip()]
        where = config.texts
    else:
        spec = DataSpec(config.images, config.format, caption_key=config.caption_key)  # type: ignore[arg-type]
        items = list(_image_items(spec, config.image_key))
        where = config.images
    if not items:
        raise ValueError(f"{where}: nothing to embed (no {'texts' if config.texts else 'images'} found)")
    return items


def _image_items(spec: DataSpec, image_key: str) -> Iterator[Item]:
    # The evaluation readers list shards and folders without decoding; their record helpers are reused.
    from clipforge.evaluate.datasets import _caption_file_records, _tar_samples, _wds_captions

    kind = spec.resolved_format()
    if kind == "folder":
        if not os.path.isdir(spec.path):
            raise FileNotFoundError(f"image folder not found: {spec.path}")
        for ref, captions, _ in _caption_file_records(os.path.abspath(spec.path), spec.caption_key):
            yield Item(ref.path, "\n".join(captions), ref)
    elif kind == "webdataset":
        wanted = {"json"} if spec.caption_key.startswith("json:") else {spec.caption_key}
        for key, ref, members in _tar_samples(spec.path, wanted):
            ref = ImageRef(os.path.abspath(ref.path), ref.offset, ref.size) if ref else None
            yield Item(key, "\n".join(_wds_captions(members, spec.caption_key)), ref)
    else:
        yield from _csv_items(spec.path, image_key, spec.caption_key)


def _csv_items(path: str, image_key: str, caption_key: str) -> Iterator[Item]:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
        if image_key not in (reader.fieldnames or []):
            raise ValueError(
                f"{path}: no column {image_key!r} (--image-key); the header is {reader.fieldnames}"
            )
        for row in reader:
            image = (row[image_key] or "").strip()
            file = os.path.join(root, image) if image else ""
            yield Item(file, (row.get(caption_key) or "").strip(), ImageRef(file) if image else None)


def fingerprint(items: list[Item]) -> str:
    """A hash of the listing: a resumed run must be continuing the same items in the same order."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([str(item.ref or ""), item.path, item.caption]).encode())
    return digest.hexdigest()[:16]


def embed(config: EmbedConfig, progress: bool = True, world: World | None = None) -> EmbedResult:
    """Embed this process's share of the parts not yet in `config.out`; see the module docstring."""
    from clipforge.checkpoints import load
    from clipforge.models import for_inference, quantize_int8

    validate(config)
    world = world or World.from_env()
    items = list_items(config)
    model, _, tokenizer = load(config.model, device=config.device)
    model = quantize_int8(model) if config.int8 else for_inference(model)
    plan = {
        "kind": "text" if config.texts else "image",
        "model": config.model,
        "int8": config.int8,
        "dim": model.config.embed_dim,
        "dtype": config.dtype,
        "source": os.path.abspath(config.texts or config.images),
        "items": len(items),
        "part_size": config.part_size,
        "fingerprint": fingerprint(items),
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with store.locked(out):
        manifest = store.open_plan(out, plan)
    total = store.part_count(len(items), config.part_size)
    todo = [
        p for p in range(world.rank, total, world.world_size) if store.part_name(p) not in manifest["parts"]
    ]
    store.remove_stale_temporaries(out, {store.part_name(p) for p in todo})
    spans = [(p, p * config.part_size, min((p + 1) * config.part_size, len(items))) for p in todo]

    start = time.perf_counter()
    unit = "text" if config.texts else "img"
    desc = f"embed {world.rank}/{world.world_size}" if world.world_size > 1 else "embed"
    bar = tqdm(total=sum(e - s for _, s, e in spans), desc=desc, unit=unit, disable=not progress)
    if config.texts:
        tokenize = lambda texts: tokenizer(texts, context_length=model.context_length, truncate=True)  # noqa: E731
        parts = _text_parts(model, tokenize, items, spans, config, bar)
    else:
        parts = _image_parts(model, items, spans, config, bar)
    skipped_now = 0
    with torch.inference_mode():
        for n, ((p, s, e), (ids, vectors, skipped)) in enumerate(zip(spans, parts, strict=True), 1):
            _write(out, p, s, e, items, ids, vectors.astype(config.dtype), skipped)
            skipped_now += sum(skipped.values())
            bar.set_postfix(parts=f"{n}/{len(spans)}", skipped=skipped_now)
    bar.close()
    manifest = store.read_manifest(out)
    return EmbedResult(
        out_dir=str(out),
        parts_total=total,
        parts_done=len(manifest["parts"]),
        parts_written=len(spans),
        items_now=sum(e - s for _, s, e in spans),
        seconds=time.perf_counter() - start,
        count=manifest["count"],
        skipped=manifest["skipped"],
    )


PartVectors = tuple[list[int], np.ndarray, Counter]  # item ids kept, their vectors (N, dim), skips by reason


def _image_parts(
    model: torch.nn.Module, items: list[Item], spans: list, config: EmbedConfig, bar: tqdm
) -> Iterator[PartVectors]:
    """Each span's vectors, in order, from one DataLoader over all of them (workers start once)."""
    transform = EvalTransform(model.config.vision.image_size)
    usable = [[i for i in range(s, e) if items[i].ref is not None] for _, s, e in spans]
    flat = [i for ids in usable for i in ids]
    dataset = ImageDataset([items[i].ref for i in flat], transform, config.max_image_pixels)  # type: ignore[misc]
    batches, first = [], 0  # dataset positions, each batch inside one part
    for ids in usable:
        batches += [
            list(range(first + j, first + min(j + config.batch_size, len(ids))))
            for j in range(0, len(ids), config.batch_size)
        ]
        first += len(ids)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.workers)
    stream = iter(loader)
    first = 0
    for (_, s, e), ids in zip(spans, usable, strict=True):
        vectors, kept, failed = [], [], []
        for j in range(0, len(ids), config.batch_size):
            images, ok = next(stream)
            bar.update(len(ok))
            if ok.any():
                vectors.append(_normalized(model.encode_image(images[ok].to(config.device))))
            for k, good in enumerate(ok.tolist()):
                (kept if good else failed).append(j + k)
        skipped = Counter({MISSING_IMAGE: (e - s) - len(ids)} if e - s > len(ids) else {})
        bar.update((e - s) - len(ids))
        for k in failed:  # why, found again in this process: the few bad images only
            problem = dataset.problem(first + k)
            skipped[problem.reason if problem else "corrupt_image"] += 1
        first += len(ids)
        yield [ids[k] for k in kept], _stack(vectors, model.config.embed_dim), skipped


def _text_parts(
    model: torch.nn.Module, tokenize: Callable, items: list[Item], spans: list, config: EmbedConfig, bar: tqdm
) -> Iterator[PartVectors]:
    for _, s, e in spans:
        vectors = []
        for j in range(s, e, config.batch_size):
            tokens = tokenize([item.caption for item in items[j : min(j + config.batch_size, e)]])
            vectors.append(_normalized(model.encode_text(tokens.to(config.device))))
            bar.update(len(tokens))
        yield list(range(s, e)), _stack(vectors, model.config.embed_dim), Counter()


def _normalized(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def _stack(vectors: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)


def _write(
    out: Path,
    p: int,
    s: int,
    e: int,
    items: list[Item],
    ids: list[int],
    vectors: np.ndarray,
    skipped: Counter,
) -> None:
    rows = [items[i] for i in ids]
    table = store.part_table(
        np.asarray(ids, np.int64),
        vectors,
        paths=[item.path for item in rows],
        captions=[item.caption for item in rows],
        shards=[item.ref.path if item.ref and item.ref.size >= 0 else "" for item in rows],
        offsets=[item.ref.offset if item.ref else 0 for item in rows],
        sizes=[item.ref.size if item.ref else -1 for item in rows],
    )
    summary: dict[str, Any] = {"first": s, "end": e, "count": len(ids), "skipped": dict(skipped)}
    name = store.part_name(p)
    store.write_part(out, name, table, summary)
    store.record_part(out, name, summary)
