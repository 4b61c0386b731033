"""ONNX export: a CLIP model's image and text encoders as two graphs any ONNX runtime can run.

`export_onnx(model, dst)` writes the directory

    dst/image_encoder.onnx   "image"  float32 (N, 3, S, S), normalized pixels -> "image_embeds" (N, D)
    dst/text_encoder.onnx    "tokens" int64 (N, context_length), padded ids   -> "text_embeds"  (N, D)
    dst/metadata.json        the architecture, opset, dtype, preprocessing (size, mean, std), context
                             length, input/output names and the temperature

The graphs compute `encode_image` and `encode_text`: the embeddings are *not* L2-normalized (normalize them
before taking cosines, as `CLIP.forward` does). N is a dynamic axis: one file serves every batch size. The
text graph reads each text at its end-of-text token, the largest id (ArgMax, then a gather).

Exporter: PyTorch's TorchScript-based one (`torch.onnx.export(..., dynamo=False)`). It traces the model
once, which for these two straight-line networks is the whole program (the EOT position is data, computed
in the graph), needs no package beyond `onnx`, and exports a small model in a fraction of a second; the
torch.export-based exporter needs onnxscript and takes seconds. Opsets 17 (the default: LayerNormalization
as one op) to 20, the newest the TorchScript exporter writes.

`fp16=True` stores weights and computes in float16 while the interface stays float32 (a cast after the
input, one before the output), so the same code runs either file; LayerNorms compute in float32 inside, as
in the PyTorch model. (In the text graph the exporter's float32 causal mask also makes attention and the
residual stream float32; the projections into attention and the MLPs stay float16.) Export works from a
copy in eval mode: the model passed in is not changed, and a
`for_inference` copy exports too (same function, BatchNorms already folded).

The directory is written beside `dst` under a temporary name and renamed into place once both graphs pass
`onnx.checker`; an existing `dst` is replaced only with `overwrite=True`, and only if it is empty or an
earlier export.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.atomic import write_directory
from clipforge.models.clip import CLIP
from clipforge.models.int8 import Int8Attention, Int8Linear
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

__all__ = ["IMAGE_FILE", "METADATA_FILE", "TEXT_FILE", "OnnxExportError", "export_onnx"]

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
METADATA_FILE = "metadata.json"
FORMAT = "clipforge-onnx"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
OPSETS = range(17, 21)  # 17: LayerNormalization; 20: the newest the TorchScript exporter writes
# A protobuf message (an ONNX file without external data) cannot exceed 2 GiB.
MAX_GRAPH_BYTES = 2**31 - 1
TRACE_BATCH = 2  # the example batch the trace runs on: not 1, which an exporter may specialize on


class OnnxExportError(ValueError):
    """An export refused (bad argument, destination) or failed; the message is one line."""


def export_onnx(
    model: CLIP,
    dst: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    image_batch_dim_dynamic: bool = True,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write `dst/image_encoder.onnx`, `dst/text_encoder.onnx` and `dst/metadata.json`; return the two
    graphs' paths. `image_batch_dim_dynamic=False` fixes the image graph's batch at 1 (static shapes, for
    runtimes that want them); the text graph's batch is always dynamic."""
    target = _validate(model, dst, opset, fp16, overwrite)
    import onnx  # checked by _validate

    dtype = torch.float16 if fp16 else torch.float32
    work = copy.deepcopy(model).eval().requires_grad_(False).to(dtype)

    def write(tmp: Path) -> None:
        image_path, text_path = tmp / IMAGE_FILE, tmp / TEXT_FILE
        images = _example_images(work, TRACE_BATCH if image_batch_dim_dynamic else 1)
        dynamic = image_batch_dim_dynamic
        _export(_ImageEncoder(work), images, ("image", "image_embeds"), image_path, opset, dynamic)
        _export(_TextEncoder(work), _example_tokens(work), ("tokens", "text_embeds"), text_path, opset, True)
        for path in (image_path, text_path):
            _check_graph(onnx, path)
        meta = _metadata(model, opset, fp16, image_batch_dim_dynamic)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    try:
        write_directory(target, write)
    except OSError as e:
        raise OnnxExportError(f"cannot write the ONNX export to {target}: {_one_line(e)}") from e
    return target / IMAGE_FILE, target / TEXT_FILE


# ---- the two graphs -----------------------------------------------------------------------------------


class _ImageEncoder(nn.Module):
    """float32 pixels in, float32 embeddings out, whatever the weights' dtype (the casts are graph ops)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image).float()  # encode_image casts to the weights' dtype


class _TextEncoder(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens).float()


def _example_images(model: CLIP, batch: int) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _example_tokens(model: CLIP) -> torch.Tensor:
    # Different EOT positions per row, so nothing about where a text ends can be read as a constant.
    tokens = torch.ones(TRACE_BATCH, model.context_length, dtype=torch.long)
    for row in range(TRACE_BATCH):
        tokens[row, min(2 + row, model.context_length - 1)] = model.vocab_size - 1
    return tokens


def _export(
    module: nn.Module, example: torch.Tensor, names: tuple[str, str], path: Path, opset: int, dynamic: bool
) -> None:
    name, output = names
    axes = {name: {0: "N"}, output: {0: "N"}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter announces its deprecation and the tracer notes Python-level checks
        # (encode_text's context-length check) that a fixed-shape input makes constant: expected here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*", category=UserWarning)
        try:
            torch.onnx.export(
                module.eval(), (example,), str(path), input_names=[name], output_names=[output],
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )  # fmt: skip
        except Exception as e:  # the exporter's own errors are many-lined; keep the first line
            raise OnnxExportError(f"exporting {path.name} failed: {_one_line(e)}") from e


def _check_graph(onnx: Any, path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"the exported {path.name} fails onnx.checker: {_one_line(e)}") from e


# ---- validation and metadata --------------------------------------------------------------------------


def _validate(model: Any, dst: str | os.PathLike, opset: Any, fp16: Any, overwrite: bool) -> Path:
    """Every check that needs no writing, so a refused export leaves the file system as it was."""
    if not isinstance(model, CLIP):
        raise TypeError(f"export_onnx needs a clipforge CLIP model, got {type(model).__name__}")
    if any(isinstance(m, Int8Linear | Int8Attention) for m in model.modules()):
        raise OnnxExportError(
            "cannot export an int8 model (quantize_int8): its int32 matrix products have no ONNX form "
            "here; export the float model"
        )
    if type(opset) is not int or opset not in OPSETS:
        raise OnnxExportError(f"opset must be an integer from {OPSETS[0]} to {OPSETS[-1]}, got {opset!r}")
    if not isinstance(fp16, bool):
        raise OnnxExportError(f"fp16 must be True or False, got {fp16!r}")
    try:
        import onnx  # noqa: F401  (the checker runs on every export)
    except ImportError:
        raise OnnxExportError(
            "ONNX export needs the onnx package: pip install 'clipforge[interop]'"
        ) from None
    bytes_per_weight = 2 if fp16 else 4
    for tower in ("image", "text"):
        size = sum(p.numel() for p in model.tower_parameters(tower)) * bytes_per_weight
        if size > MAX_GRAPH_BYTES:
            raise OnnxExportError(
                f"the {tower} encoder's weights take {size / 2**30:.1f} GiB; one ONNX file holds at most "
                "2 GiB (try fp16=True)"
            )
    target = Path(dst).absolute()
    _check_destination(target, overwrite)
    return target


def _check_destination(target: Path, overwrite: bool) -> None:
    if target.parent.exists() and not target.parent.is_dir():
        raise OnnxExportError(f"cannot export to {target}: {target.parent} is not a directory")
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise OnnxExportError(f"{target} already exists; pass overwrite=True to replace it")
    if target.is_symlink() or not target.is_dir():
        raise OnnxExportError(f"cannot export to {target}: it exists and is not a directory")
    if any(target.iterdir()) and not _is_export(target):
        raise OnnxExportError(
            f"cannot export to {target}: a non-empty directory that is not a clipforge ONNX export"
        )


def _is_export(directory: Path) -> bool:
    try:
        meta = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _metadata(model: CLIP, opset: int, fp16: bool, image_batch_dim_dynamic: bool) -> dict[str, Any]:
    """What a consumer needs beside the graphs: the preprocessing, the names, and how to compare."""
    config, size = model.config, model.config.vision.image_size
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "opset": opset,
        "weights_dtype": "float16" if fp16 else "float32",
        "image": {
            "file": IMAGE_FILE,
            "input": "image",
            "input_shape": ["N" if image_batch_dim_dynamic else 1, 3, size, size],
            "input_dtype": "float32",
            "output": "image_embeds",
            # clipforge's eval transform (OpenAI's): resize, center crop, /255, then (x - mean) / std.
            "image_size": size,
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
        },
        "text": {
            "file": TEXT_FILE,
            "input": "tokens",
            "input_shape": ["N", config.text.context_length],
            "input_dtype": "int64",
            "output": "text_embeds",
            "context_length": config.text.context_length,
            "vocab_size": config.text.vocab_size,
        },
        "embed_dim": config.embed_dim,
        "embeddings": "not L2-normalized: normalize before taking cosines",
        # logits = logit_scale * cos(image, text) (+ logit_bias), as CLIP.forward computes them.
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach().float()),
    }


# ---- writing ------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
