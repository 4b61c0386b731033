"""From a source to training batches: decode -> transform -> tokenize -> collate, deterministically.

``data.batch_size`` is the *global* batch. The stream of global batches is a pure function of (data,
config, seed), and process ``r`` of ``W`` gets positions ``[r*B/W, (r+1)*B/W)`` of each: the processes'
batches joined are the one-process batch, and a run resumed at batch ``k``, on as many processes or on
another number, sees exactly the batches the first run would have seen from ``k`` on:

* map-style sources (synthetic, csv, folder) -- batch ``g`` is computed directly: epoch ``g // P``
  (``P = len(source) // batch_size``; the last partial batch of an epoch is dropped), samples
  ``perm[s*B:(s+1)*B]`` of that epoch's permutation (seeded by (seed, epoch)); a process takes its slice
  of them. Any worker can make any batch: starting at batch ``k``, worker ``w`` of ``K`` makes batches
  ``k + w + nK`` and the DataLoader, which asks its workers in turn, yields ``k, k+1, ...``.
* streamed sources (webdataset) -- batch ``g`` is chunk ``g`` of each of ``data.shard_streams`` shard
  streams (`clipforge.data.streams`). A process reads only its own streams, each worker some of them;
  every worker makes its part of every batch, and the process joins the parts of batch ``g`` in stream
  order. Resuming reads the skipped chunks' raw samples without decoding them. The stream of batches
  does not depend on the number of processes or workers once ``data.shard_streams`` is fixed.

A bad sample is dropped from its batch (which is then smaller than B) and counted in ``Batch.skipped``
by reason: counts travel with the batches, so they reach the training process from any worker.
Random augmentation is keyed by (seed, epoch, sample), never by which process, worker or when, and nothing
here draws from the global random states (torch's, numpy's, Python's): those belong to the training loop.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.config import DataConfig
from clipforge.data.labels import ClassCaptions
from clipforge.data.samples import (
    MISSING_IMAGE,
    SKIP_REASONS,
    RawSample,
    Skip,
    choose_caption,
    derive_seed,
    image_skip,
    read_caption,
)
from clipforge.data.sources import Source, build_source, source_labels
from clipforge.data.streams import split, stream_chunks, worker_streams
from clipforge.data.webdataset import ShardSource
from clipforge.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

Tokenizer = Callable[..., torch.Tensor]  # tok(list_of_str, context_length=77, truncate=True) -> [N, ctx]
Transform = EvalTransform | TrainTransform


@dataclass
class Batch:
    images: torch.Tensor  # [n, 3, H, W] float, normalised; n <= batch_size (skipped samples are dropped)
    tokens: torch.Tensor  # [n, context_length] int64, row i is the caption of image i
    skipped: dict[str, int]  # samples dropped from this batch, per reason in SKIP_REASONS (zeros included)
    index: int  # the global batch: batches(k) yields indices k, k+1, ... on every process
    # The epoch the samples come from (streamed sources: the earliest of its streams' epochs, each stream
    # having its own; resampled: 0).
    epoch: int

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> Batch:
        """Called by the DataLoader with ``pin_memory=True``."""
        return replace(self, images=self.images.pin_memory(), tokens=self.tokens.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        images = self.images.to(device, non_blocking=non_blocking)
        return replace(self, images=images, tokens=self.tokens.to(device, non_blocking=non_blocking))

    @staticmethod
    def join(parts: Sequence[Batch]) -> Batch:
        """Parts of one batch (the same index), made from consecutive streams, as one batch."""
        if len(parts) == 1:
            return parts[0]
        skipped = {reason: sum(part.skipped[reason] for part in parts) for reason in SKIP_REASONS}
        images = torch.cat([part.images for part in parts])
        tokens = torch.cat([part.tokens for part in parts])
        return Batch(images, tokens, skipped, parts[0].index, min(part.epoch for part in parts))


# ----------------------------------------------------------------------------------------------------
# One batch: decode each sample, count the bad ones, tokenize the captions together, stack
# ----------------------------------------------------------------------------------------------------


class BatchMaker:
    """Turns a list of raw samples into a `Batch`; runs in the worker processes (picklable)."""

    def __init__(
        self,
        transform: Transform,
        tokenizer: Tokenizer,
        image_size: int,
        context_length: int,
        captions: str = "all",
        max_pixels: int | None = None,
        labels: ClassCaptions | None = None,
    ) -> None:
        self.transform = transform
        self.max_pixels = max_pixels  # DataConfig.max_image_pixels: larger images are skipped undecoded
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.context_length = context_length
        self.captions = captions  # DataConfig.captions: "all" or "sample" (one line of several)
        self.labels = labels  # captions = "templates": label -> template-filled class name
        self._warned: set[str] = set()

    def __call__(
        self, samples: Sequence[tuple[RawSample, int]], index: int, epoch: int, extra: Counter[str]
    ) -> Batch:
        """``samples``: (raw sample, augmentation key) pairs; ``extra``: skips counted elsewhere."""
        skipped = {reason: extra.get(reason, 0) for reason in SKIP_REASONS}
        images, captions = [], []
        for raw, key in samples:
            try:
                image, caption = self.decode(raw, key)
            except Skip as skip:
                skipped[skip.reason] += 1
                self._warn_once(skip, raw)
                continue
            images.append(image)
            captions.append(caption)
        return Batch(self._stack(images), self._tokenize(captions), skipped, index, epoch)

    def decode(self, raw: RawSample, key: int) -> tuple[torch.Tensor, str]:
        """One sample -> (image tensor, caption); raises `Skip` when it cannot be used."""
        if self.labels is not None:
            caption = self.labels.caption(raw.label, key)  # keyed like a "sample" caption line
        else:
            caption = choose_caption(read_caption(raw.caption), key, self.captions)
        if raw.image is None:
            raise Skip(MISSING_IMAGE)
        try:
            image = raw.image
            if not isinstance(image, Image.Image):
                image = self.transform.load(image, self.max_pixels)
            if isinstance(self.transform, TrainTransform):
                return self.transform(image, key=key), caption
            return self.transform(image), caption
        except Exception as exc:  # PIL raises many types for broken files; none may stop training
            raise image_skip(exc) from exc

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack(images)

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        if not captions:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        tokens = self.tokenizer(captions, context_length=self.context_length, truncate=True)
        return torch.as_tensor(tokens, dtype=torch.long)

    def _warn_once(self, skip: Skip, raw: RawSample) -> None:
        if skip.reason not in self._warned:  # per process: enough to see what is wrong, not a flood
            self._warned.add(skip.reason)
            log.warning("skipping sample %s (%s); further skips are only counted", raw.key, skip)


# ----------------------------------------------------------------------------------------------------
# The stream: which samples make batch g
# ----------------------------------------------------------------------------------------------------


class EpochOrder:
    """Map-style sources: batch ``g`` -> (epoch, sample indices) by arithmetic on per-epoch permutations."""

    def __init__(self, samples: int, batch_size: int, seed: int) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.batches_per_epoch = samples // batch_size
        self.seed = seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def batch(self, g: int) -> tuple[int, list[int]]:
        epoch, slot = divmod(g, self.batches_per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, cached: batches arrive in order
            rng = np.random.default_rng(derive_seed(self.seed, "order", epoch))
            self._epoch, self._perm = epoch, rng.permutation(self.samples)
        start = slot * self.batch_size
        return epoch, self._perm[start : start + self.batch_size].tolist()


class BatchStream(IterableDataset):
    """The endless batch stream from ``start_batch`` on, as one DataLoader worker's share of it."""

    def __init__(self, data: TrainData, start_batch: int) -> None:
        super().__init__()
        self.source = data.source
        self.make = data.make
        self.batch_size = data.cfg.batch_size
        self.seed = data.seed
        self.start_batch = start_batch
        self.rank, self.world_size, self.streams = data.rank, data.world_size, data.streams

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.worker_batches(worker, workers)

    def worker_batches(self, worker: int, workers: int) -> Iterator[Batch]:
        """What worker ``worker`` of ``workers`` yields. Streamed: its part of every batch from
        ``start_batch`` on; map-style: this process's share of batches ``start_batch + worker + n * workers``.
        """
        if isinstance(self.source, ShardSource):
            return self._streamed(worker_streams(self.rank, self.world_size, self.streams, worker, workers))
        return self._mapped(self.start_batch + worker, workers)

    def _mapped(self, first: int, step: int) -> Iterator[Batch]:
        order = EpochOrder(len(self.source), self.batch_size, self.seed)
        mine = split(self.rank, self.world_size, self.batch_size)  # this process's batch positions
        for g in itertools.count(first, step):
            epoch, indices = order.batch(g)
            samples = []
            for index in indices[mine.start : mine.stop]:
                raw = self.source[index]
                samples.append((raw, derive_seed(epoch, raw.key)))
            yield self.make(samples, g, epoch, Counter())

    def _streamed(self, streams: range) -> Iterator[Batch]:
        assert isinstance(self.source, ShardSource)
        readers = []
        for stream in streams:
            size = len(split(stream, self.streams, self.batch_size))  # its positions in every batch
            chunks = stream_chunks(self.source, stream, self.streams, size)
            for _ in range(self.start_batch):  # resume: the skipped chunks are read, never decoded
                next(chunks)
            readers.append(chunks)
        for g in itertools.count(self.start_batch):
            parts = [next(chunks) for chunks in readers]
            samples = [(raw, derive_seed(tag, raw.key)) for part in parts for raw, tag in part.samples]
            errors = sum((part.errors for part in parts), Counter())
            yield self.make(samples, g, min(part.epoch for part in parts), errors)


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """The training data of one run, as process ``rank`` of ``world_size`` sees it: `batches` gives its
    share of the run's deterministic, endless stream of global batches."""

    cfg: DataConfig
    source: Source
    make: BatchMaker
    seed: int
    rank: int = 0
    world_size: int = 1

    @property
    def streams(self) -> int:
        """Streamed sources: the number of shard streams making each batch (all processes together)."""
        return self.cfg.streams(self.world_size)

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples in one pass over the data (webdataset: counted from local tars; None if remote)."""
        if isinstance(self.source, ShardSource):
            return self.source.samples_per_epoch
        return len(self.source)

    @property
    def batches_per_epoch(self) -> int | None:
        """Map-style sources: global batches in an epoch; streamed ones: None (each stream has its own)."""
        if isinstance(self.source, ShardSource):
            return None
        return len(self.source) // self.cfg.batch_size

    def batches(self, start_batch: int = 0) -> Iterator[Batch]:
        """This process's share of global batches ``start_batch``, ``start_batch + 1``, ... forever; the
        same ones on every call.

        The loader (and its workers) start now, not at the first ``next``, and draw nothing from the
        global random states: a training loop can set those after this call, and they stay its own.
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        stream = BatchStream(self, start_batch)
        workers = self.cfg.workers
        # Streamed sources: every worker makes its part of every batch, joined here; pinning the parts
        # would be lost in the join, so the joined batch is pinned instead.
        parts = max(1, workers) if isinstance(self.source, ShardSource) else 1
        pin = self.cfg.pin_memory and torch.cuda.is_available()
        loader = DataLoader(
            stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch if workers else None,
            pin_memory=pin and parts == 1,
            # The workers' base seed comes from here, not from torch's global generator (which a
            # training step's patch dropout draws from). Batches are keyed by (seed, epoch, sample),
            # so the workers' own seeds change nothing in them.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader")),
        )
        return _in_order(iter(loader), start_batch, parts, pin and parts > 1)


def _in_order(batches: Iterator[Batch], start_batch: int, parts: int, pin: bool) -> Iterator[Batch]:
    """Batches ``start_batch, ...``, each joined from the next ``parts`` items (the workers' parts, which
    the loader yields in turn)."""
    for expected in itertools.count(start_batch):
        group = [next(batches) for _ in range(parts)]
        if any(part.index != expected for part in group):  # the loader stopped taking workers in turn
            got = [part.index for part in group]
            raise RuntimeError(f"data stream out of order: got batch parts {got}, expected {expected}")
        batch = Batch.join(group)
        yield batch.pin_memory() if pin else batch


def build_train_loader(
    cfg: DataConfig, tokenizer: Tokenizer, image_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> TrainData:
    """Check ``cfg`` and its files now (errors name what is missing), and return process ``rank`` of
    ``world_size``'s `TrainData`.

    ``seed`` orders the samples and drives augmentation; the data itself (incl. which synthetic picture
    is which) does not depend on it. Neither do the global batches depend on ``world_size``
    (webdataset: once ``data.shard_streams`` is set).
    """
    cfg.validate(world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    source = build_source(cfg, image_size, seed, world_size)
    if not isinstance(source, ShardSource) and len(source) < cfg.batch_size:
        raise ValueError(f"{source!r} has {len(source)} samples, fewer than data.batch_size={cfg.batch_size}")
    transform = _transform(cfg, image_size, seed)
    make = BatchMaker(
        transform,
        tokenizer,
        image_size,
        cfg.context_length,
        cfg.captions,
        cfg.max_image_pixels,
        source_labels(cfg, source),
    )
    return TrainData(cfg, source, make, seed, rank, world_size)


def _transform(cfg: DataConfig, image_size: int, seed: int) -> Transform:
    # Synthetic pictures are drawn at the final size with their own randomness: a crop would only blur
    # them and could cut off a shape whose position the caption names. The eval transform leaves them be.
    if cfg.source == "synthetic" or not cfg.augment:
        return EvalTransform(image_size)
    return TrainTransform(image_size, scale=cfg.crop_scale, seed=derive_seed(seed, "augment"))
