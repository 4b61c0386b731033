"""`clipforge search INDEX --text "..." | --image PATH [-k 10] [--json]`: the best hits, path, score, caption.

The query is encoded with the model the index was built from (override with --model). See docs/search.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="search an index with a text or an image",
        description="Encode a text or an image with the index's model and print the k best hits: score, "
        "path (a file or a shard key) and caption (docs/search.md).",
    )
    p.add_argument("index", help="an index directory (clipforge index --out)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", help="an image file as the query")
    p.add_argument("-k", type=int, default=10, help="how many hits")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.add_argument("--model", default="", help="encode the query with this model instead of the index's")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.apps.index import SearchIndex
    from clipforge.apps.search import encoder_for, search

    try:
        if args.k < 1:
            raise ValueError(f"-k must be >= 1, got {args.k}")
        index = SearchIndex.open(args.index)
        encoder = encoder_for(index, args.model, args.device)
        hits = search(index, encoder, text=args.text, image=args.image, k=args.k)
    except (OSError, ValueError) as e:
        print(f"clipforge search: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=1))
        return 0
    for hit in hits:
        caption = " / ".join(hit.caption.splitlines())
        print(f"{hit.score:.4f}  {hit.path}" + (f"  {caption}" if caption else ""))
    return 0
