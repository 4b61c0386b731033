"""A safetensors file's header, read and checked without reading a tensor.

The format: 8 bytes of little-endian header length, the JSON header (`{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`), then the tensor bytes. The header is read with a
bounded length and every entry is checked against the file's size, so a file that declares more than it
holds is refused before anything is allocated; its tensors come back as "meta" tensors (shape and dtype
only), which is all that checking them against a model needs.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints.safe_unpickle import CheckpointError

# The header of a CLIP with a thousand tensors is ~100 KB; anything past this is not a weights file.
MAX_HEADER_BYTES = 16 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file starts like a safetensors file (a length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 0


def read_header(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: meta tensor of the declared shape and dtype}; `CheckpointError` for a malformed header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        length = struct.unpack("<Q", head)[0]
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: safetensors header of {length:,} bytes (the file has {size:,}; "
                f"at most {MAX_HEADER_BYTES:,} are read)"
            )
        text = f.read(length)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    return {name: _entry(path, name, spec, data_bytes) for name, spec in header.items()}


def _entry(path: Path, name: str, spec: Any, data_bytes: int) -> torch.Tensor:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} in the safetensors header {problem}")

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad("must be an object with exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise bad(f"has dtype {spec['dtype']!r}; known: {', '.join(DTYPES)}")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise bad(f"has shape {shape!r}: not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise bad(f"has data_offsets {offsets!r}: not [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
        raise bad(f"declares {nbytes:,} bytes at [{begin:,}, {end:,}) of a {data_bytes:,}-byte data section")
    return torch.empty(shape, dtype=dtype, device="meta")
