"""`clipforge convert SRC DST --to FORMAT`: a model from any format `clipforge.load` reads to another.

    clipforge convert ViT-B-32.pt out/ --to clipforge
    clipforge convert openclip/ViT-B-32:laion2b_s34b_b79k b32.pt --to openclip
    clipforge convert run/epoch_32.pt hub/ --to openclip --hub
    clipforge convert my-model/ hf/ --to hf

See docs/interop.md for the formats and what is checked.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from clipforge.convert import FORMATS

    p = subparsers.add_parser(
        "convert",
        help="convert a model between clipforge, OpenAI, OpenCLIP, Hugging Face and ONNX formats",
        description="Read SRC (anything clipforge.load() reads: a file, a directory or a pretrained name) "
        "and write it to DST in another format. Everything is checked before anything is written.",
    )
    p.add_argument("src", help="a file, a directory, or a pretrained name")
    p.add_argument("dst", help="the file (openai, openclip) or directory (the others) to write")
    p.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    p.add_argument(
        "--hub", action="store_true", help="openclip: a hub directory (open_clip_config.json + safetensors)"
    )
    p.add_argument(
        "--architecture",
        default=None,
        metavar="NAME",
        help="the architecture of SRC's weights, where the file cannot tell (e.g. openclip/ViT-B-32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from clipforge.convert import convert

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            done = convert(
                args.src,
                args.dst,
                args.to,
                hub=args.hub,
                overwrite=args.overwrite,
                architecture=args.architecture,
            )
    except (OSError, ValueError) as e:  # CheckpointError and the writers' errors are ValueErrors
        print(f"clipforge convert: {e}", file=sys.stderr)
        return 2
    notes = [*(str(w.message) for w in caught if str(w.message) not in done.notes), *done.notes]
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {done.path} ({args.to}{' hub' if args.hub else ''}) from {done.source_format}")
    if args.to == "openclip":
        name = done.openclip_name or "<name>"
        where = f"local-dir:{done.path}" if args.hub else name
        how = (
            f"open_clip.create_model({where!r})"
            if args.hub
            else f"open_clip.create_model({where!r}, pretrained={str(done.path)!r})"
        )
        print(f"load it with {how}")
        if done.openclip_name is None and not args.hub:
            print(
                "OpenCLIP has no name for this architecture: register the file's model_cfg with "
                "open_clip.add_model_config first"
            )
    return 0
