"""The HTTP API and its page: `create_app(model, tokenizer, index=...)` gives a FastAPI app.

    POST /classify   multipart: image, labels (comma-separated or repeated), templates (optional, one a
                     line or repeated) -> the labels with zero-shot probabilities, most likely first
    GET  /search     ?q=text&k=12 -> the index's nearest images to the text, with thumbnails
    POST /search     multipart: image (and k) -> the index's nearest images to the image
    POST /embed      multipart or form: image or text -> its L2-normalized embedding
    GET  /healthz    liveness, the model, the index, the batch queue's counters
    GET  /           the page (static/index.html): text search and zero-shot labels, no build step

Every model call goes through one `BatchQueue`. Decoding and preprocessing run in the thread pool, a few at
a time (each holds a decoded image), never on the event loop (server.py). A refused request gets a 4xx JSON
{"error": "..."} saying what was wrong (limits.py); an unexpected failure is a 500 for that request alone.
Zero-shot scores are computed as `clipforge eval zeroshot` computes them (evaluate/zeroshot.py).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from clipforge.apps.serve.batching import BatchQueue
from clipforge.apps.serve.limits import BodyLimit, Limits, RequestError
from clipforge.apps.serve.routes import router
from clipforge.apps.serve.server import Server

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)  # the paper's default prompt (§3.1.4)


def _check_setup(model: torch.nn.Module, index: Any, templates: tuple[str, ...]) -> None:
    if index is not None and index.dim != model.config.embed_dim:
        raise ValueError(
            f"the index holds {index.dim}-d embeddings and the model makes {model.config.embed_dim}-d ones: "
            "build the index with this model"
        )
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' where the label goes")


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure becomes {"error": "..."}: the refusals with their status, anything else a 500."""

    @app.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(error).__name__}"}, status_code=500)


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
    _check_setup(model, index, templates)
    device = next(model.parameters()).device
    encoders = {
        "image": lambda images: model.encode_image(images.to(device)).float().cpu(),
        "text": lambda tokens: model.encode_text(tokens.to(device)).float().cpu(),
    }
    queue = BatchQueue(encoders, max_batch=max_batch, max_wait=max_wait, batching=batching)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.close()

    app = FastAPI(title="clipforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(model, tokenizer, index, limits, tuple(templates), queue, name)
    app.state.page = (resources.files("clipforge.apps.serve") / "static" / "index.html").read_text("utf-8")
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    _add_error_handlers(app)
    app.include_router(router)
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
