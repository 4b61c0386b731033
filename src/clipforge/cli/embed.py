"""`clipforge embed --model M --images DIR|SHARDS|CSV --out DIR` (or `--texts FILE`): Parquet parts.

Resumable: run the same command again after an interruption and it continues. Under `torchrun
--nproc-per-node N` each process embeds its share of the parts. See docs/search.md.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed a collection of images or texts into resumable Parquet parts",
        description="Embed every image (or text) of a source with a model: L2-normalized vectors with ids, "
        "paths and captions, in Parquet parts plus manifest.json (docs/search.md). Run it again to continue "
        "an interrupted run; under torchrun each process embeds its share of the parts.",
    )
    p.add_argument(
        "--model", required=True, help="a release name, a clipforge/checkpoint directory or a file"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images, tar shards (a-{000..009}.tar) or a CSV/TSV")
    source.add_argument("--texts", help="a text file: one text a line")
    p.add_argument("--out", required=True, help="the embeddings directory (created, or continued)")
    p.add_argument("--format", choices=["auto", "folder", "webdataset", "csv"], default="auto")
    p.add_argument(
        "--caption-key", default="txt", help="caption: shard member ('txt', 'json:FIELD'), CSV column, suffix"
    )
    p.add_argument("--image-key", default="filepath", help="CSV column of image paths")
    p.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="how vectors are stored"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0: decode in-process)")
    p.add_argument("--part-size", type=int, default=10_000, help="items per part (the unit of resumption)")
    p.add_argument("--int8", action="store_true", help="encode with the int8 inference copy (docs/int8.md)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        metavar="N",
        help="leave out (and count) images with more pixels, undecoded (default 64,000,000; 0: no limit)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.apps.embed import EmbedConfig, embed

    config = EmbedConfig(
        model=args.model,
        out=args.out,
        images=args.images or "",
        texts=args.texts or "",
        format=args.format,
        caption_key=args.caption_key,
        image_key=args.image_key,
        dtype=args.dtype,
        batch_size=args.batch_size,
        workers=args.workers,
        part_size=args.part_size,
        int8=args.int8,
        device=args.device,
        max_image_pixels=args.max_image_pixels,
    )
    try:
        result = embed(config, progress=not args.no_progress)
    except (OSError, ValueError) as e:
        print(f"clipforge embed: {e}", file=sys.stderr)
        return 2
    rate = result.items_now / result.seconds if result.seconds > 0 else 0.0
    print(f"embedded {result.items_now:,} items in {result.seconds:.1f} s ({rate:.1f}/s) this run")
    skipped = ", ".join(f"{n} {reason}" for reason, n in result.skipped.items()) or "none"
    print(
        f"{result.out_dir}: {result.parts_done}/{result.parts_total} parts, {result.count:,} vectors; "
        f"skipped: {skipped}"
    )
    return 0
