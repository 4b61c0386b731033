"""The state behind the HTTP routes: the model's queue, the tokenizer, the index, the limits, and the
caches of zero-shot weights and thumbnails. Blocking work (decoding, building a classifier, searching) is
done here and called from the routes in the thread pool; every model call goes through one `BatchQueue`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.apps.serve.batching import BatchQueue
from clipforge.apps.serve.limits import Limits, RequestError, check_content_type, decode_image
from clipforge.evaluate.zeroshot import build_classifier
from clipforge.transforms import EvalTransform
from clipforge.transforms.loading import load_image

log = logging.getLogger(__name__)

THUMB_SIDE = 160  # pixels, the longer side of a search result's thumbnail
DECODE_SLOTS = 4  # images decoded at once: bounds the memory that concurrent uploads take
CLASSIFIER_CACHE = 16  # label sets whose zero-shot weights are kept: a page asks with the same labels
THUMB_CACHE = 2048


class _QueuedTextModel:
    """Stands in for the model where `build_classifier` calls `encode_text`: each call goes through the
    queue, so a classify request's prompts batch with other requests' texts."""

    def __init__(self, queue: BatchQueue) -> None:
        self.queue = queue

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.queue.run("text", tokens)


class Server:
    """The state behind the routes: model, queue, index, limits and the caches."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        index: Any,
        limits: Limits,
        templates: tuple[str, ...],
        queue: BatchQueue,
        name: str,
    ) -> None:
        self.config = model.config
        self.tokenizer = tokenizer
        self.index = index
        self.limits = limits
        self.templates = templates
        self.queue = queue
        self.name = name
        self.transform = EvalTransform(model.config.vision.image_size)
        self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self._lock = threading.Lock()
        self._classifiers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._thumbs: OrderedDict[int, str | None] = OrderedDict()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, truncate=True)  # texts are length-checked; the tail of a long one goes

    def preprocess(self, data: bytes, content_type: str | None) -> torch.Tensor:
        """(1, 3, S, S): the eval transform of an uploaded image (blocking: call in the thread pool)."""
        check_content_type(content_type)
        with self._decode_slots:
            return self.transform(decode_image(data, self.limits))[None]

    def classifier(self, labels: list[str], templates: list[str]) -> torch.Tensor:
        """(D, C) zero-shot weights, cached by label set (blocking: call in the thread pool)."""
        key = (tuple(labels), tuple(templates))
        with self._lock:
            if key in self._classifiers:
                self._classifiers.move_to_end(key)
                return self._classifiers[key]
        weights = build_classifier(_QueuedTextModel(self.queue), self.tokenize, labels, templates)
        with self._lock:
            self._classifiers[key] = weights
            while len(self._classifiers) > CLASSIFIER_CACHE:
                self._classifiers.popitem(last=False)
        return weights

    async def encode(self, kind: str, inputs: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalized features of N images or token rows, through the queue."""
        try:
            features = await asyncio.wrap_future(self.queue.submit(kind, inputs))
        except Exception as e:
            log.exception("model call failed")
            raise RequestError(500, f"model call failed: {type(e).__name__}: {e}") from None
        return F.normalize(features.float(), dim=-1)

    def require_index(self) -> None:
        if self.index is None:
            raise RequestError(404, "search: no index loaded (start the server with --index)")

    def search(self, query: torch.Tensor, k: int) -> list[dict]:
        """The index's k nearest to a (1, D) normalized query, with thumbnails (blocking)."""
        self.require_index()
        hits = self.index.search(query.numpy().astype("float32"), k)[0]
        return [
            {"id": h.id, "score": h.score, "path": h.path, "caption": h.caption, "thumb": self.thumbnail(h)}
            for h in hits
        ]

    def thumbnail(self, hit: Any) -> str | None:
        """A small JPEG data URL of a hit's image (None when its bytes are unavailable or unreadable)."""
        with self._lock:
            if hit.id in self._thumbs:
                return self._thumbs[hit.id]
        url = None
        try:
            data = self.index.image_bytes(hit)
            if data is not None:
                with self._decode_slots:
                    image = load_image(data, THUMB_SIDE, max_pixels=self.limits.max_pixels)
                    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
                    out = io.BytesIO()
                    image.convert("RGB").save(out, format="JPEG", quality=80)
                url = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
        except Exception as e:  # a bad file in the collection costs its thumbnail, not the request
            log.warning("no thumbnail for %s: %s", hit.path, e)
        with self._lock:
            self._thumbs[hit.id] = url
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return url

    def health(self) -> dict:
        index = None
        if self.index is not None:
            index = {"count": self.index.count, "model": self.index.model, "dim": self.index.dim}
        return {
            "status": "ok",
            "model": self.name,
            "dim": self.config.embed_dim,
            "image_size": self.config.vision.image_size,
            "index": index,
            "templates": list(self.templates),
            "batching": {
                "enabled": self.queue.batching,
                "max_batch": self.queue.max_batch,
                "max_wait_ms": self.queue.max_wait * 1000,
            },
            "queue": self.queue.stats(),
            "limits": asdict(self.limits),
        }
