"""Weights to and from other ecosystems: one module per foreign format, and `convert` between them.

The interchange point is a clipforge model: (CLIPConfig, OpenAI-layout state dict). Reading goes through
`clipforge.load`, which recognizes every format by content; `convert(src, dst, to)` writes one of:

    clipforge  a clipforge directory: config.json + model.safetensors (+ tokenizer/ if the source had one)
    openai     a state dict .pt that OpenAI's `clip.load(path, jit=False)` loads (.safetensors: the same
               tensors without pickle)                                                       (openai.py)
    openclip   a .pt checkpoint for `open_clip.create_model(name, pretrained=FILE)`; `hub=True`: a
               directory for `open_clip.create_model("local-dir:DIR")`                     (openclip.py)
    hf         a transformers CLIPModel directory                                                (hf.py)
    onnx       the image and text encoders as two ONNX graphs                                   (onnx.py)

Everything is checked before anything is written: the source is read and verified in full, the target
format must hold the model exactly (OpenAI's code rebuilds only QuickGELU models with 64-wide heads;
OpenAI's and OpenCLIP's formats carry OpenAI's tokenizer only), and an existing destination is refused
unless `overwrite`. Files appear at `dst` complete or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.atomic import write_directory, write_file

FORMATS = ("clipforge", "openai", "openclip", "hf", "onnx")
_FILE_SUFFIXES = {"openai": (".pt", ".pth", ".bin", ".safetensors"), "openclip": (".pt", ".pth", ".bin")}


@dataclass
class Converted:
    """What `convert` wrote, and what the user should know about it."""

    path: Path
    source_format: str  # what the source was recognized as
    notes: list[str] = field(default_factory=list)
    openclip_name: str | None = None  # the name to give open_clip.create_model, if OpenCLIP has one


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    hub: bool = False,
    overwrite: bool = False,
    architecture: str | None = None,
) -> Converted:
    """Read `src` (anything `clipforge.load` reads: a file, a directory or a pretrained name; with
    `architecture`, `src` is a weights file for that named architecture) and write it to `dst` as `to`.

    Raises `CheckpointError` (a ValueError) naming the problem, before anything is written."""
    from clipforge.checkpoints.load import open_model
    from clipforge.checkpoints.safe_unpickle import CheckpointError

    target = _check_target(Path(dst), to, hub, overwrite)
    if architecture is not None:
        model, weights, source = open_model(architecture, pretrained=src)
    else:
        model, weights, source = open_model(src)
    if target.absolute() == Path(source).absolute():
        raise CheckpointError(f"{target} is the source itself: write the conversion elsewhere")
    tokenizer = _tokenizer(weights)
    notes = [weights.note] if weights.note and weights.config is None else []
    _check_fits_target(model, tokenizer, to, source)
    if weights.preprocess:
        notes.append(
            f"the source normalizes images with mean {list(weights.preprocess.get('mean', ()))} and std "
            f"{list(weights.preprocess.get('std', ()))}; the {to} output records OpenAI's: normalize "
            "that way yourself"
        )
    _write(model, tokenizer, target, to, hub, overwrite)
    from clipforge.convert.openclip import openclip_name

    name = openclip_name(model.config) if to == "openclip" else None
    return Converted(target, weights.format, notes, name)


def _check_target(target: Path, to: str, hub: bool, overwrite: bool) -> Path:
    from clipforge.checkpoints.safe_unpickle import CheckpointError

    if to not in FORMATS:
        raise CheckpointError(f"unknown target format {to!r}; choose one of {', '.join(FORMATS)}")
    if hub and to != "openclip":
        raise CheckpointError("--hub is a layout of the openclip format: use it with --to openclip")
    is_file = to in _FILE_SUFFIXES and not hub
    if is_file and target.suffix not in _FILE_SUFFIXES[to]:
        raise CheckpointError(
            f"{target}: a {to} file must end in {' or '.join(_FILE_SUFFIXES[to])}"
            + (" (or pass --hub for a directory)" if to == "openclip" else "")
        )
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{target} exists: pass --overwrite to replace it")
        if is_file and target.is_dir():
            raise CheckpointError(f"{target} is a directory: a {to} file cannot replace it")
        if not is_file and not target.is_dir():
            raise CheckpointError(f"{target} is a file: the {to} output is a directory")
        if hub and any(target.iterdir()) and not (target / "open_clip_config.json").is_file():
            raise CheckpointError(
                f"cannot replace {target}: a non-empty directory, not an OpenCLIP hub directory"
            )
    return target


def _tokenizer(weights: Any) -> Any | None:
    """The source's own tokenizer (None: it carries none, OpenAI's applies)."""
    if weights.tokenizer is not None:
        return weights.tokenizer
    if weights.tokenizer_dir is None:
        return None
    from clipforge.tokenizer import get_tokenizer

    return get_tokenizer(weights.tokenizer_dir)


def _check_fits_target(model: Any, tokenizer: Any | None, to: str, source: Path) -> None:
    from clipforge.checkpoints.safe_unpickle import CheckpointError
    from clipforge.convert.openai import incompatibilities

    if to == "openai" and incompatibilities(model.config):
        problems = "; ".join(incompatibilities(model.config))
        raise CheckpointError(
            f"{source} cannot be written for OpenAI's code, which would rebuild it differently: {problems} "
            "(--to openclip or --to hf keep it exactly)"
        )
    if to in ("openai", "openclip", "onnx") and tokenizer is not None and tokenizer.identity != "openai":
        raise CheckpointError(
            f"{source} comes with its own tokenizer ({tokenizer.identity}), which the {to} format cannot "
            "carry (it implies OpenAI's): convert to clipforge or hf instead"
        )


def _write(model: Any, tokenizer: Any | None, target: Path, to: str, hub: bool, overwrite: bool) -> None:
    if to == "clipforge":
        from clipforge.checkpoints.native import save_native

        _replaceable_dir(target, overwrite)
        save_native(model, target, tokenizer)
    elif to == "hf":
        from clipforge.convert.hf import write_hf

        _replaceable_dir(target, overwrite)
        write_hf(model, tokenizer, target)
    elif to == "onnx":
        from clipforge.convert.onnx import export_onnx

        export_onnx(model, target, overwrite=overwrite)
    elif to == "openclip" and hub:
        from clipforge.convert.openclip import write_hub

        write_directory(target, lambda tmp: write_hub(model, tmp))
    elif to == "openclip":
        from clipforge.convert.openclip import write_checkpoint

        write_file(target, lambda tmp: write_checkpoint(model, tmp))
    else:
        from clipforge.convert.openai import write_openai

        safetensors = target.suffix == ".safetensors"
        write_file(target, lambda tmp: write_openai(model, tmp, safetensors=safetensors))


def _replaceable_dir(target: Path, overwrite: bool) -> None:
    # The writers replace only their own kind of directory; an empty one is set aside here for them.
    if overwrite and target.is_dir() and not any(target.iterdir()):
        target.rmdir()
