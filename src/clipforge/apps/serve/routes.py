"""The API's routes. Each reads the `Server` from `request.app.state.server`; parsing refuses a bad request
with a `RequestError` (a 4xx JSON {"error": "..."}, see limits.py) before any model call.
"""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from clipforge.apps.serve.limits import (
    Limits,
    RequestError,
    check_prompts,
    check_text,
    parse_k,
    parse_labels,
    parse_templates,
)
from clipforge.apps.serve.server import Server
from clipforge.evaluate.zeroshot import zeroshot_logits

router = APIRouter()


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
# Routes
# ----------------------------------------------------------------------------------------------------


def _server(request: Request) -> Server:
    return request.app.state.server


@router.get("/", response_class=HTMLResponse)
async def index_page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


@router.get("/healthz")
async def healthz(request: Request) -> dict:
    return _server(request).health()


@router.post("/classify")
async def classify(request: Request) -> dict:
    server = _server(request)
    form = await _form(request, server.limits, multipart_only=True)
    upload = _upload(form)
    labels = parse_labels(_texts(form, "labels"), server.limits)
    chosen = parse_templates(_texts(form, "templates"), server.limits) or list(server.templates)
    check_prompts(labels, chosen, server.limits)
    image = await _image(server, upload)
    weights = await run_in_threadpool(server.classifier, labels, chosen)
    logits = zeroshot_logits(await server.encode("image", image), weights)[0]  # (C,)
    probs = logits.softmax(dim=-1)
    order = probs.argsort(descending=True).tolist()
    ranked = [{"label": labels[i], "probability": probs[i].item(), "logit": logits[i].item()} for i in order]
    return {"labels": ranked, "templates": chosen}


@router.get("/search")
async def search_text(request: Request) -> dict:
    server = _server(request)
    q = request.query_params.get("q")
    if q is None:
        raise RequestError(400, "q: missing (GET /search?q=some+text)")
    q = check_text(q, "q", server.limits)
    k = parse_k(request.query_params.get("k"), server.limits)
    server.require_index()  # before any model call
    query = await server.encode("text", server.tokenize([q]))
    return {"query": q, "results": await run_in_threadpool(server.search, query, k)}


@router.post("/search")
async def search_image(request: Request) -> dict:
    server = _server(request)
    form = await _form(request, server.limits, multipart_only=True)
    upload = _upload(form)
    k_values = _texts(form, "k")
    k = parse_k(k_values[0] if k_values else request.query_params.get("k"), server.limits)
    server.require_index()
    query = await server.encode("image", await _image(server, upload))
    return {"results": await run_in_threadpool(server.search, query, k)}


@router.post("/embed")
async def embed(request: Request) -> dict:
    server = _server(request)
    form = await _form(request, server.limits, multipart_only=False)
    has_image, texts = form.get("image") is not None, _texts(form, "text")
    if has_image == bool(texts):
        raise RequestError(400, "give exactly one of: image (a file) or text")
    if has_image:
        features, kind = await server.encode("image", await _image(server, _upload(form))), "image"
    else:
        text = check_text(texts[0], "text", server.limits)
        features, kind = await server.encode("text", server.tokenize([text])), "text"
    return {"kind": kind, "dim": features.shape[1], "embedding": features[0].tolist()}
