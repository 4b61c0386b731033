"""Webdataset source: tar shards in img2dataset's layout, read with the `webdataset` library.

A sample is the files of a shard that share a key: ``000123.jpg`` (or png / webp) + ``000123.txt``
(+ an optional ``000123.json``, ignored unless it holds the label: ``data.captions = "templates"``).
Shards are named by a brace pattern (``data/train-{000..008}.tar``), several patterns joined by ``::``, or
URLs the library can open.

The source reads *streams* of samples (`clipforge.data.streams` cuts them into batches). In epoch ``e``
the shard list is shuffled by (seed, e); stream ``s`` of ``S`` reads every S-th shard of that order
(shards ``s, s+S, ...``), and its samples pass through a shuffle buffer seeded by (seed, e, s). Resampled,
stream ``s`` instead draws shard after shard with replacement, draw ``n`` chosen by (seed, s, n), through
one buffer seeded by (seed, s). Either way a stream is a function of (seed, shards, S, s), never of
timing or of which process reads it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from clipforge.data.labels import shard_label
from clipforge.data.samples import UNREADABLE_SHARD, RawSample, derive_seed
from clipforge.data.tarfiles import tar_files

log = logging.getLogger(__name__)
T = TypeVar("T")


class ShardSource:
    """Streamed source: `epoch_samples` / `resampled_samples` yield one stream's samples, shuffled."""

    def __init__(
        self,
        spec: str,
        image_suffixes: tuple[str, ...],
        caption_suffix: str,
        shuffle_buffer: int,
        seed: int,
        resampled: bool = False,
        label_key: str = "",
    ) -> None:
        self.urls = expand_shards(spec)
        self.label_key = label_key  # data.captions = "templates": json field or "cls"; "" = no labels
        self.image_suffixes = image_suffixes
        self.caption_suffix = caption_suffix.strip().lstrip(".").lower()
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled  # streams draw shards with replacement, without epochs

    def epoch_samples(
        self, epoch: int, stream: int, streams: int, errors: Counter[str]
    ) -> Iterator[RawSample]:
        """Stream ``stream`` of ``streams`` in epoch ``epoch``: its shards' samples, shuffled in a buffer.

        Tar-level failures (a shard that will not open, a tar that breaks mid-way) are added to ``errors``
        and the stream moves on; the pipeline reports them in a batch's ``skipped``.
        """
        order = list(self.urls)
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        raw = self._read(order[stream::streams], errors)
        rng = random.Random(derive_seed(self.seed, "samples", epoch, stream))
        return shuffle_buffer(raw, self.shuffle_buffer, rng)

    def resampled_shard(self, stream: int, draw: int) -> str:
        """The shard of a resampled stream's draw ``draw``: uniform over the shards, with replacement."""
        return self.urls[derive_seed(self.seed, "resample", stream, draw) % len(self.urls)]

    def resampled_samples(self, stream: int, errors: Counter[str]) -> Iterator[tuple[RawSample, str]]:
        """A resampled stream, endless: (sample, draw tag) pairs, the tag naming the stream and draw.

        The tag goes into the sample's augmentation key, so a sample drawn twice gets two crops.
        Raises RuntimeError when ``len(urls) * 100`` draws in a row yield no sample (no usable shard).
        """

        def draws() -> Iterator[tuple[RawSample, str]]:
            empty = 0  # draws in a row that gave nothing
            for draw in itertools.count():
                tag = f"s{stream}d{draw}"  # a str: never equal to an epoch number's key
                found = False
                for raw in self._read([self.resampled_shard(stream, draw)], errors):
                    found = True
                    yield raw, tag
                empty = 0 if found else empty + 1
                if empty > 100 * len(self.urls):  # else a stream of empty shards spins forever
                    raise RuntimeError(f"resampled stream {stream}: {empty} draws in a row gave no sample")

        rng = random.Random(derive_seed(self.seed, "resampled samples", stream))
        return shuffle_buffer(draws(), self.shuffle_buffer, rng)

    def _read(self, urls: list[str], errors: Counter[str]) -> Iterator[RawSample]:
        handler = functools.partial(_count_error, errors)
        # Grouped shard by shard, so a sample never spans two shards whatever the library's version.
        samples = (s for url in urls for s in group_by_keys(_shard_files(url, handler), handler=handler))
        return (self._raw_sample(sample) for sample in samples)

    @functools.cached_property
    def samples_per_epoch(self) -> int | None:
        """Samples in all shards (read from the local tars' headers once); None if a shard is remote."""
        if not all(is_local(url) for url in self.urls):
            return None
        return sum(count_samples(local_path(url)) for url in self.urls)

    def _raw_sample(self, sample: dict[str, Any]) -> RawSample:
        image = next((sample[s] for s in self.image_suffixes if s in sample), None)
        shard = os.path.basename(sample.get("__url__", ""))
        # The key names the shard's file, not its folder: moving the data keeps the augmentations.
        key = f"{shard}/{sample['__key__']}"
        if self.label_key:
            return RawSample(image=image, caption=None, key=key, label=shard_label(sample, self.label_key))
        return RawSample(image=image, caption=sample.get(self.caption_suffix), key=key)

    def __repr__(self) -> str:
        return f"ShardSource({len(self.urls)} shards, first {self.urls[0]!r})"


def _shard_files(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """The files of one shard, as webdataset's `group_by_keys` takes them.

    A local shard goes through our fast reader (`clipforge.data.tarfiles`), others through webdataset's
    opener (URLs, ``pipe:``); both give the same files in the same order.
    """
    if not is_local(url):
        yield from tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler)
        return
    try:
        for name, data in tar_files(local_path(url)):
            yield {"fname": name, "data": data, "__url__": url}
    except (OSError, tarfile.TarError) as exc:
        handler(exc)


def _count_error(errors: Counter[str], exn: Exception) -> bool:
    """webdataset's error handler: count and report the failure, then carry on with the next file."""
    log.warning("skipping unreadable shard data: %r", exn)  # rare, and worth seeing each time
    errors[UNREADABLE_SHARD] += 1
    return True


def expand_shards(spec: str) -> list[str]:
    """The shard list of ``spec`` (braces, ``::``); every local shard must exist (error names the missing)."""
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"data.path {spec!r} names no shards")
    missing = [url for url in urls if is_local(url) and not os.path.isfile(local_path(url))]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"data.path: {len(missing)} of {len(urls)} shard(s) not found: {shown}")
    return urls


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream with a buffer of ``size`` items: each arriving item takes a random slot's place.

    Holds ``size`` items before yielding the first; at the end the rest is shuffled and drained.
    ``size`` <= 1 leaves the order alone.
    """
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def count_samples(path: str) -> int:
    """Distinct sample keys in a local tar (headers only: the tar is seeked, not read)."""
    with tarfile.open(path, "r:") as tar:
        keys = {base_plus_ext(member.name)[0] for member in tar if member.isreg()}
    keys.discard(None)
    return len(keys)


def is_local(url: str) -> bool:
    """A shard on this machine's file system (a path or a file: URL), not a remote URL or a pipe: command."""
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    """The file system path of a local shard URL."""
    return url.removeprefix("file://").removeprefix("file:")
