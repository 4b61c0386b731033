"""The HTTP API and its page: `create_app(model, tokenizer, index=...)` gives a FastAPI app.

    POST /classify   multipart: image, labels (comma-separated or repeated), templates (optional, one a
                     line or repeated) -> the labels with zero-shot probabilities, most likely first
    GET  /search     ?q=text&k=12 -> the index's nearest images to the text, with thumbnails
    POST /search     multipart: image (and k) -> the index's nearest images to the image
    POST /embed      multipart or form: image or text -> its L2-normalized embedding
    GET  /healthz    liveness, the model, the index, the batch queue's counters
    GET  /           the page (static/index.html): text search and zero-shot labels, no build step

Every model call goes through one `BatchQueue`. Decoding and preprocessing run in the thread pool, a few at
a time (each holds a decoded image), never on the event loop. A refused request gets a 4xx JSON
{"error": "..."} saying what was wrong (limits.py); an unexpected failure is a 500 for that request alone.
Zero-shot scores are computed as `clipforge eval zeroshot` computes them (evaluate/zeroshot.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from clipforge.apps.serve.batching import BatchQueue
from clipforge.apps.serve.limits import (
    BodyLimit,
    Limits,
    RequestError,
    check_content_type,
    check_prompts,
    check_text,
    decode_image,
    parse_k,
    parse_labels,
    parse_templates,
)
from clipforge.evaluate.zeroshot import build_classifier, zeroshot_logits
from clipforge.transforms import EvalTransform
from clipforge.transforms.loading import load_image

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)  # the paper's default prompt (§3.1.4)
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


# ----------------------------------------------------------------------------------------------------
# Request parsing
# ----------------------------------------------------------------------------------------------------


async def _form(request: Request, limits: Limits, multipart_only: bool) -> FormData:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    allowed = ["multipart/form-data"] + ([] if multipart_only else ["application/x-www-form-urlencoded"])
    if kind not in allowed:
        raise RequestError(415, f"request content type {kind or 'none'!r}: expected {' or '.join(allowed)}")
    fields = limits.max_labels + limits.max_templates + 8
    return await request.form(max_files=1, max_fields=fields)


def _texts(form: FormData, name: str) -> list[str]:
    values = form.getlist(name)
    if any(not isinstance(v, str) for v in values):
        raise RequestError(400, f"{name}: expected text, got a file")
    return values


def _upload(form: FormData, name: str = "image") -> UploadFile:
    value = form.get(name)
    if value is None:
        raise RequestError(400, f"{name}: missing (a multipart file field named {name!r})")
    if isinstance(value, str):
        raise RequestError(400, f"{name}: expected a file upload, got a text field")
    return value


async def _image(server: Server, upload: UploadFile) -> torch.Tensor:
    return await run_in_threadpool(server.preprocess, await upload.read(), upload.content_type)


# ----------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------


def create_app(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    index: Any = None,
    limits: Limits | None = None,
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    batching: bool = True,
    max_batch: int = 32,
    max_wait: float = 0.005,
    name: str = "",
) -> FastAPI:
    """The API over an eval-mode `model` and its `tokenizer`; `index` (a `SearchIndex`) enables search."""
    limits = limits or Limits()
    if index is not None and index.dim != model.config.embed_dim:
        raise ValueError(
            f"the index holds {index.dim}-d embeddings and the model makes {model.config.embed_dim}-d ones: "
            "build the index with this model"
        )
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' where the label goes")
    device = next(model.parameters()).device
    encoders = {
        "image": lambda images: model.encode_image(images.to(device)).float().cpu(),
        "text": lambda tokens: model.encode_text(tokens.to(device)).float().cpu(),
    }
    queue = BatchQueue(encoders, max_batch=max_batch, max_wait=max_wait, batching=batching)
    server = Server(model, tokenizer, index, limits, tuple(templates), queue, name)
    page = (resources.files("clipforge.apps.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.close()

    app = FastAPI(title="clipforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)

    @app.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(error).__name__}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict:
        return server.health()

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        form = await _form(request, limits, multipart_only=True)
        upload = _upload(form)
        labels = parse_labels(_texts(form, "labels"), limits)
        chosen = parse_templates(_texts(form, "templates"), limits) or list(server.templates)
        check_prompts(labels, chosen, limits)
        image = await _image(server, upload)
        weights = await run_in_threadpool(server.classifier, labels, chosen)
        logits = zeroshot_logits(await server.encode("image", image), weights)[0]  # (C,)
        probs = logits.softmax(dim=-1)
        order = probs.argsort(descending=True).tolist()
        return {
            "labels": [
                {"label": labels[i], "probability": probs[i].item(), "logit": logits[i].item()} for i in order
            ],
            "templates": chosen,
        }

    @app.get("/search")
    async def search_text(request: Request) -> dict:
        q = request.query_params.get("q")
        if q is None:
            raise RequestError(400, "q: missing (GET /search?q=some+text)")
        q = check_text(q, "q", limits)
        k = parse_k(request.query_params.get("k"), limits)
        server.require_index()  # before any model call
        query = await server.encode("text", server.tokenize([q]))
        return {"query": q, "results": await run_in_threadpool(server.search, query, k)}

    @app.post("/search")
    async def search_image(request: Request) -> dict:
        form = await _form(request, limits, multipart_only=True)
        upload = _upload(form)
        k_values = _texts(form, "k")
        k = parse_k(k_values[0] if k_values else request.query_params.get("k"), limits)
        server.require_index()
        query = await server.encode("image", await _image(server, upload))
        return {"results": await run_in_threadpool(server.search, query, k)}

    @app.post("/embed")
    async def embed(request: Request) -> dict:
        form = await _form(request, limits, multipart_only=False)
        has_image, texts = form.get("image") is not None, _texts(form, "text")
        if has_image == bool(texts):
            raise RequestError(400, "give exactly one of: image (a file) or text")
        if has_image:
            features, kind = await server.encode("image", await _image(server, _upload(form))), "image"
        else:
            text = check_text(texts[0], "text", limits)
            features, kind = await server.encode("text", server.tokenize([text])), "text"
        return {"kind": kind, "dim": features.shape[1], "embedding": features[0].tolist()}

    return app


def load_app(
    model: str,
    index: str | None = None,
    *,
    device: str = "cpu",
    limits: Limits | None = None,
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    batching: bool = True,
    max_batch: int = 32,
    max_wait: float = 0.005,
) -> FastAPI:
    """`create_app` over `clipforge.load(model)` (its inference copy) and `SearchIndex.open(index)`."""
    import clipforge
    from clipforge.apps.index import SearchIndex

    loaded, _, tokenizer = clipforge.load(model, device=device)
    opened = SearchIndex.open(index) if index else None
    if opened is not None and opened.model != model:
        log.warning("the index was built with model %r; serving %r", opened.model, model)
    return create_app(
        clipforge.for_inference(loaded),
        tokenizer,
        index=opened,
        limits=limits,
        templates=templates,
        batching=batching,
        max_batch=max_batch,
        max_wait=max_wait,
        name=str(model),
    )
