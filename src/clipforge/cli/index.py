"""`clipforge index EMBEDDINGS --out INDEX [--add]`: a faiss index over an embeddings directory.

Exact (IndexFlatIP) below --exact-below vectors, IVF-Flat above it, with its recall@10 printed. --add
puts the parts INDEX does not hold yet into it, without a rebuild. See docs/search.md.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from clipforge.apps.index import EXACT_BELOW, RECALL_QUERIES, TARGET_RECALL

    p = subparsers.add_parser(
        "index",
        help="build a search index over an embeddings directory, or add new parts to one",
        description="Index the vectors of `clipforge embed` (docs/search.md): exact inner product below "
        "--exact-below vectors, IVF-Flat above, its recall@10 against exact search measured and printed.",
    )
    p.add_argument("embeddings", help="an embeddings directory (clipforge embed --out)")
    p.add_argument("--out", required=True, help="the index directory")
    p.add_argument("--add", action="store_true", help="add the parts --out does not hold yet (ids continue)")
    p.add_argument("--exact-below", type=int, default=EXACT_BELOW, help="exact index below this many vectors")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 * sqrt(N))")
    p.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="IVF cells scored per query (default: the smallest power of two reaching --target-recall)",
    )
    p.add_argument("--target-recall", type=float, default=TARGET_RECALL)
    p.add_argument("--recall-queries", type=int, default=RECALL_QUERIES, help="vectors used as test queries")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.apps.index import add_to_index, build_index

    try:
        for name in ("exact_below", "recall_queries", "nlist", "nprobe"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "exact_below" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if args.add:
            index = add_to_index(args.out, args.embeddings)
        else:
            index = build_index(
                args.embeddings,
                args.out,
                exact_below=args.exact_below,
                nlist=args.nlist,
                nprobe=args.nprobe,
                target_recall=args.target_recall,
                recall_queries=args.recall_queries,
                seed=args.seed,
            )
    except (OSError, ValueError) as e:
        print(f"clipforge index: {e}", file=sys.stderr)
        return 2
    print(f"{index.path}: {index.count:,} vectors of dim {index.dim} from {index.model!r}")
    return 0
