"""`clipforge merge A B --alpha 0.5 --out C`: WiSE-FT, the weights (1 − α)·A + α·B as a new model.

    clipforge merge ViT-B-32 run/final --alpha 0.5 --out wise-b32/

A and B are anything `clipforge.load()` reads, of the same architecture (A the zero-shot model, B its
fine-tuned copy). C is a clipforge directory with A's tokenizer. See docs/fine-tuning.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="WiSE-FT: interpolate the weights of two models of one architecture",
        description="Write (1 - alpha) * A + alpha * B (Wortsman et al. 2022, WiSE-FT) as a clipforge "
        "directory with A's tokenizer. A and B: anything clipforge.load() reads (a release name, a clipforge "
        "or checkpoint directory, a file). Everything is checked before anything is written.",
    )
    p.add_argument("a", metavar="A", help="the zero-shot model (alpha = 0)")
    p.add_argument("b", metavar="B", help="the fine-tuned model (alpha = 1), same architecture as A")
    p.add_argument("--alpha", required=True, help="the weight of B, in [0, 1]")
    p.add_argument(
        "--extrapolate", action="store_true", help="allow an alpha outside [0, 1] (past A or past B)"
    )
    p.add_argument("--out", required=True, help="the clipforge directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a clipforge directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.checkpoints import native
    from clipforge.finetune.merge import check_alpha, load_pair, merge_models

    try:
        alpha = check_alpha(args.alpha, args.extrapolate)
        out = _check_out(Path(args.out), args.overwrite, (args.a, args.b))
        model_a, model_b, tokenizer = load_pair(args.a, args.b)
        merged = merge_models(model_a, model_b, alpha, extrapolate=args.extrapolate)
        del model_a, model_b
        native.save_native(merged, out, tokenizer)
    except (OSError, ValueError) as e:  # CheckpointError and the merge's refusals are ValueErrors
        print(f"clipforge merge: {_one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out}: (1 - alpha) * {args.a} + alpha * {args.b}, alpha = {alpha:g}")
    return 0


def _check_out(out: Path, overwrite: bool, inputs: tuple[str, str]) -> Path:
    """Refuse an existing --out unless asked to replace it (and then only a clipforge directory), and an
    --out that is one of the inputs."""
    from clipforge.checkpoints import native

    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it")
    if not native.is_native_dir(out):
        raise ValueError(f"cannot replace {out}: not a clipforge directory")
    if any(Path(i).exists() and Path(i).resolve() == out.resolve() for i in inputs):
        raise ValueError(f"{out} is one of the inputs: write the merge elsewhere")
    return out


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
