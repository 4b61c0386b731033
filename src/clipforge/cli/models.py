"""`clipforge models`: list the named architectures with their parameter counts."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the named model architectures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from clipforge.models import available_models, create_model

    width = max(map(len, available_models()))
    for name in available_models():
        with torch.device("meta"):
            model = create_model(name)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:{width}s} {n:>13,d} parameters  image {model.config.vision.image_size}px")
    return 0
