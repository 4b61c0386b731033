"""`clipforge serve --model M [--index INDEX]`: zero-shot labels, search and embeddings over HTTP.

    clipforge serve --model runs/quickstart/step-00000300 --index photos.index --port 8000

Serves the API and its page (docs/serving.md) with uvicorn on --host/--port (default 127.0.0.1:8000: this
machine only; pass --host 0.0.0.0 to listen on every interface).
"""

from __future__ import annotations

import argparse
import logging

from clipforge.apps.serve.limits import Limits

_LIMIT_HELP = {
    "max_upload_bytes": "largest request body, counted as it arrives",
    "max_pixels": "largest image, width x height, read from its header before decoding",
    "max_labels": "most labels in one classify request",
    "max_templates": "most prompt templates in one classify request",
    "max_prompts": "most labels x templates in one classify request",
    "max_text_chars": "longest query, label, template or text",
    "max_k": "most search results per query",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve zero-shot labels, search and embeddings over HTTP, with a page",
        description="Serve a model (and a search index) over HTTP: POST /classify, GET|POST /search, "
        "POST /embed, GET /healthz, and a page at /. See docs/serving.md.",
    )
    p.add_argument("--model", required=True, help="a release name, a clipforge directory or a weights file")
    p.add_argument("--index", default="", help="a search index (clipforge index) to serve /search from")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--templates",
        default="",
        help="default prompt templates: a file, a built-in set or a literal like 'a photo of a {}.' "
        "(default: 'a photo of a {}.'); a request may send its own",
    )
    batching = p.add_argument_group("batching")
    batching.add_argument("--max-batch", type=int, default=32, help="most rows in one model call")
    batching.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a call waits for more requests to join it"
    )
    batching.add_argument(
        "--no-batching", action="store_true", help="one model call per request (for comparison)"
    )
    limits = p.add_argument_group("limits (a request over one gets a 4xx JSON error)")
    for field, text in _LIMIT_HELP.items():
        default = getattr(Limits, field)
        limits.add_argument(
            "--" + field.replace("_", "-"), type=int, default=default, help=f"{text} (default {default:,})"
        )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from clipforge.apps.serve.app import DEFAULT_TEMPLATES, load_app
    from clipforge.evaluate.prompts import load_templates

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        limits = Limits(**{field: getattr(args, field) for field in _LIMIT_HELP})
        templates = tuple(load_templates(args.templates)) if args.templates else DEFAULT_TEMPLATES
        app = load_app(
            args.model,
            args.index or None,
            device=args.device,
            limits=limits,
            templates=templates,
            batching=not args.no_batching,
            max_batch=args.max_batch,
            max_wait=args.max_wait_ms / 1000,
        )
    except (OSError, ValueError) as e:
        print(f"clipforge serve: {e}")
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
