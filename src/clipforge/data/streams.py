"""Shard streams: batches from a streamed source that are the same on any number of processes and workers.

A streamed source (webdataset) has no random access: its samples come from shards read front to back.
So the global batch of ``B`` samples is cut into ``S`` pieces (``data.shard_streams``), and piece ``s``
is filled by *stream* ``s``, an independent reader of its own shards (`ShardSource.epoch_samples`):

    batch g = chunk g of stream 0 + chunk g of stream 1 + ... + chunk g of stream S-1

Stream ``s`` owns positions ``[s*B//S, (s+1)*B//S)`` of every batch (``B // S`` or one more), so batch
``g`` depends only on (shards, seed, S, B). Process ``r`` of ``W`` trains on positions
``[r*B/W, (r+1)*B/W)``; when ``W`` divides both ``S`` and ``B`` those are exactly the positions of streams
``r*S/W ... (r+1)*S/W - 1`` (``floor(r*(S/W)*B/S) = r*B/W``), so a process reads and decodes only its own
streams. Its DataLoader workers split those streams again, each worker reading whole streams; every worker
makes its part of every batch and the process joins the parts in stream order (`pipeline`).

Each stream has its own epochs: in epoch ``e`` it reads its share of that epoch's shard order and yields
whole chunks, the partial last one dropped. Streams whose shards hold different numbers of samples drift
apart by a few chunks an epoch; nothing waits for the others. A resampled stream has no epochs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from clipforge.data.samples import RawSample
from clipforge.data.webdataset import ShardSource


def split(part: int, parts: int, items: int) -> range:
    """Piece ``part`` of ``range(items)`` cut into ``parts`` contiguous pieces of near-equal length."""
    return range(part * items // parts, (part + 1) * items // parts)


def rank_streams(rank: int, world_size: int, streams: int) -> range:
    """The streams process ``rank`` reads: those whose batch positions are its slice of the batch."""
    return split(rank, world_size, streams)


def worker_streams(rank: int, world_size: int, streams: int, worker: int, workers: int) -> range:
    """The streams worker ``worker`` of process ``rank``'s ``workers`` reads: a contiguous share."""
    mine = rank_streams(rank, world_size, streams)
    piece = split(worker, workers, len(mine))
    return mine[piece.start : piece.stop]


@dataclass
class Chunk:
    """Stream s's share of one batch, read but not decoded."""

    epoch: int  # the stream's epoch (0 for a resampled stream)
    samples: list[tuple[RawSample, int | str]]  # (sample, tag): its augmentation key is derive_seed(tag, key)
    errors: Counter[str]  # tar-level failures met while reading this chunk


def stream_chunks(source: ShardSource, stream: int, streams: int, size: int) -> Iterator[Chunk]:
    """Stream ``stream`` of ``streams`` cut into chunks of ``size`` samples, endlessly."""
    if source.resampled:
        return _resampled_chunks(source, stream, size)
    return _epoch_chunks(source, stream, streams, size)


def _epoch_chunks(source: ShardSource, stream: int, streams: int, size: int) -> Iterator[Chunk]:
    errors: Counter[str] = Counter()
    for epoch in itertools.count():
        chunk: list[tuple[RawSample, int | str]] = []
        seen = 0
        for raw in source.epoch_samples(epoch, stream, streams, errors):
            seen += 1
            chunk.append((raw, epoch))  # the epoch as tag: a sample gets a new crop each epoch
            if len(chunk) == size:
                yield Chunk(epoch, chunk, Counter(errors))
                errors.clear()
                chunk = []
        if seen < size:  # else this loop would spin forever without yielding
            raise RuntimeError(
                f"shard stream {stream} of {streams} found {seen} samples in its shards of epoch {epoch}, "
                f"fewer than its {size} per batch: use fewer data.shard_streams (or data.workers), a "
                "smaller data.batch_size, or more shards"
            )


def _resampled_chunks(source: ShardSource, stream: int, size: int) -> Iterator[Chunk]:
    errors: Counter[str] = Counter()
    chunk: list[tuple[RawSample, int | str]] = []
    for raw, tag in source.resampled_samples(stream, errors):
        chunk.append((raw, tag))
        if len(chunk) == size:
            yield Chunk(0, chunk, Counter(errors))
            errors.clear()
            chunk = []
