"""Read PyTorch zip archives (torch.save and TorchScript) without running anything from the file.

A PyTorch archive is a zip holding `<prefix>/data.pkl` (a pickle) and `<prefix>/data/<key>` (the raw bytes
of each storage). Pickles can call any importable function, so `data.pkl` is read with `RestrictedUnpickler`,
whose `find_class` hands out only inert stand-ins written here:

- tensor rebuilds (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`) become our own function,
  which views the storage's bytes with `torch.frombuffer` + `as_strided`; no torch function named by the
  file is ever called;
- typed storage classes (`torch.FloatStorage`, `torch.HalfStorage`, ...) become dtype markers;
- `collections.OrderedDict` is the real (immutable, C-implemented) class;
- TorchScript's module classes (`__torch__.*`) become `ScriptObject`s that only record their state;
- TorchScript's container tags (`torch.jit._pickle.restore_type_tag`, `build_intlist`, ...) return data.

Anything else (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) raises `UnsafeCheckpointError`,
naming the global and the file, before the global is imported or called. TorchScript code (`code/`) and
`constants.pkl` are never read; `torch.load` and `torch.jit.load` are never called on a zip archive.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import sys
import zipfile
from typing import Any

import torch


class CheckpointError(ValueError):
    """A weights file that cannot be loaded: wrong format, missing keys, unexpected shapes."""


class UnsafeCheckpointError(CheckpointError):
    """A weights file whose pickle references something other than tensors and plain containers."""

    def __init__(self, global_name: str, path: str | os.PathLike | None = None, detail: str = ""):
        self.global_name = global_name
        self.path = None if path is None else os.fspath(path)
        where = f" in {self.path}" if self.path else ""
        super().__init__(
            f"refusing to load{where}: its pickle references {global_name!r}, which is not a tensor, storage "
            f"or plain container; nothing from the file was run{detail}"
        )


# Storage classes by the name torch.save / torch.jit.save write after `torch.`.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


class _Inert:
    """Base of every stand-in the unpickler hands out: the pickle's BUILD opcode cannot alter it."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(f"malformed pickle: it tries to set the state of {self!r}")


class StorageType(_Inert):
    """Stands for `torch.<Name>Storage` in a pickle: just the dtype of the bytes."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: torch.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class Storage(_Inert):
    """A storage read from the archive: a flat 1-D tensor of its dtype."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        object.__setattr__(self, "flat", flat)

    def __repr__(self) -> str:
        return f"Storage({self.flat.dtype}, {self.flat.numel()})"


class _Function(_Inert):
    """One of our own functions, standing for the torch function of the same role in a pickle."""

    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Any):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.name


class ScriptObject:
    """A TorchScript object (usually a module) from an archive: its class name and recorded state."""

    qualname = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    @property
    def attributes(self) -> dict[str, Any]:
        """Attribute name -> value; empty for objects whose state is not a dict (custom __getstate__)."""
        state = self.__dict__.get("state")
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


_SCRIPT_CLASSES: dict[str, type[ScriptObject]] = {}


def _script_class(qualname: str) -> type[ScriptObject]:
    # One inert subclass per TorchScript class name, so that error messages can name it.
    if qualname not in _SCRIPT_CLASSES:
        _SCRIPT_CLASSES[qualname] = type("ScriptObject", (ScriptObject,), {"qualname": qualname})
    return _SCRIPT_CLASSES[qualname]


def _as_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointError(f"malformed tensor record: {what} is {value!r}")
    return tuple(value)


def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """Our `_rebuild_tensor_v2`: a strided view of the storage's elements, bounds-checked."""
    if not isinstance(storage, Storage) or type(offset) is not int or offset < 0:
        raise CheckpointError(f"malformed tensor record: storage {storage!r}, offset {offset!r}")
    size, stride = _as_ints(size, "size"), _as_ints(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"malformed tensor record: size {size} and stride {stride} differ in length")
    extent = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if extent > storage.flat.numel():
        raise CheckpointError(f"malformed tensor record: size {size} at offset {offset} overruns its storage")
    if extent == 0:
        return torch.empty(size, dtype=storage.flat.dtype)
    return storage.flat.as_strided(size, stride, offset)


def rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """Our `_rebuild_parameter`: parameters load as plain tensors."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"malformed parameter record: {type(data).__name__}")
    return data


def _identity(value: Any, *_ignored: Any) -> Any:
    return value


def _as_list(value: Any) -> list:
    return list(value)


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _as_list,
    ("torch.jit._pickle", "build_doublelist"): _as_list,
    ("torch.jit._pickle", "build_boollist"): _as_list,
    ("torch.jit._pickle", "build_tensorlist"): _as_list,
}


def allowed_global(module: str, name: str) -> Any | None:
    """The stand-in for `module.name`, or None where that global is not allowed."""
    if (module, name) in _FUNCTIONS:
        return _Function(f"{module}.{name}", _FUNCTIONS[(module, name)])
    if module == "torch" and name in STORAGE_DTYPES:
        return StorageType(name, STORAGE_DTYPES[name])
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "__torch__" or module.startswith("__torch__."):
        return _script_class(f"{module}.{name}")
    return None


def _python3_name(module: str, name: str) -> tuple[str, str]:
    # Protocol 0-2 pickles name Python 2 modules (`__builtin__.eval`); report their Python 3 names.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds tensors and plain containers and refuses every other global.

    `storages(key, dtype, numel)` supplies the bytes behind persistent ids; without it, a pickle that
    refers to a storage is refused.
    """

    def __init__(self, file: io.BufferedIOBase, path: str | os.PathLike | None = None, storages: Any = None):
        super().__init__(file)
        self.path = path
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        found = allowed_global(module, name)
        if found is None:
            raise UnsafeCheckpointError(f"{module}.{name}", self.path)
        return found

    def persistent_load(self, pid: Any) -> Storage:
        ok = isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
        ok = ok and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and type(pid[4]) is int
        if not ok:
            raise CheckpointError(f"malformed storage reference {pid!r} in {self.path}")
        if self.storages is None:
            raise CheckpointError(f"{self.path}: a pickle outside an archive refers to storage {pid[2]!r}")
        return self.storages(pid[2], pid[1].dtype, pid[4])


def safe_loads(data: bytes, path: str | os.PathLike | None = None) -> Any:
    """Unpickle bytes holding only plain data (no tensors), refusing every global but the allowed ones."""
    return RestrictedUnpickler(io.BytesIO(data), path).load()


def _archive_prefix(zf: zipfile.ZipFile, path: str | os.PathLike) -> str:
    prefixes = [n[: -len("data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        raise CheckpointError(f"{path} is a zip file but not a PyTorch archive (no single <name>/data.pkl)")
    return prefixes[0]


def _byteswap(flat: torch.Tensor) -> torch.Tensor:
    size = flat.element_size()
    if size == 1:
        return flat
    return flat.view(torch.uint8).view(-1, size).flip(1).contiguous().view(flat.dtype).view(-1)


class _StorageReader:
    """Reads `<prefix>/data/<key>` entries into flat tensors, once per key."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, path: str | os.PathLike):
        self.zf, self.prefix, self.path = zf, prefix, path
        self.cache: dict[str, Storage] = {}
        order = prefix + "byteorder"
        file_order = zf.read(order).decode().strip() if order in zf.namelist() else "little"
        self.swap = file_order != sys.byteorder

    def __call__(self, key: str, dtype: torch.dtype, numel: int) -> Storage:
        if key not in self.cache:
            self.cache[key] = Storage(self._read(key, dtype, numel))
        if self.cache[key].flat.dtype != dtype:
            raise CheckpointError(f"{self.path}: storage {key!r} is referenced with two dtypes")
        return self.cache[key]

    def _read(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self.prefix}data/{key}"
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage entry {name!r} is missing") from None
        if numel < 0 or info.file_size < nbytes:
            have = info.file_size
            raise CheckpointError(f"{self.path}: storage {name!r} holds {have} bytes, needs {nbytes}")
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        buf = bytearray(nbytes)
        view, pos = memoryview(buf), 0
        with self.zf.open(info) as f:
            while pos < nbytes:
                n = f.readinto(view[pos : min(nbytes, pos + (64 << 20))])
                if not n:
                    raise CheckpointError(f"{self.path}: storage {name!r} ends early")
                pos += n
        flat = torch.frombuffer(buf, dtype=dtype)
        return _byteswap(flat) if self.swap else flat


def is_zip_archive(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_archive(path: str | os.PathLike) -> Any:
    """The object pickled in a torch.save / torch.jit.save zip archive, tensors rebuilt on the CPU.

    For torch.save files that is usually a dict of tensors; for TorchScript archives a `ScriptObject`
    tree. Globals outside the allow-list raise `UnsafeCheckpointError`.
    """
    with zipfile.ZipFile(path) as zf:
        prefix = _archive_prefix(zf, path)
        data = zf.read(prefix + "data.pkl")
        unpickler = RestrictedUnpickler(io.BytesIO(data), path, _StorageReader(zf, prefix, path))
        return _load(unpickler, path)


def _load(unpickler: RestrictedUnpickler, path: str | os.PathLike) -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt pickle: EOFError, UnpicklingError, TypeError from a bad REDUCE, ...
        raise CheckpointError(f"{path}: cannot read its pickle ({type(e).__name__}: {e})") from e


# The first pickle of torch's legacy (pre-1.6, non-zip) format is this magic number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_legacy(path: str | os.PathLike) -> Any:
    """A legacy (non-zip) torch.save file, through `torch.load(weights_only=True)`.

    Its first pickle is checked with our unpickler first, so a plain malicious pickle is refused here
    with our error; torch's weights-only unpickler guards the rest and its refusals are re-raised as ours.
    """
    with open(path, "rb") as f:
        first = _load(RestrictedUnpickler(f, path), path)
    if first != LEGACY_MAGIC:
        raise CheckpointError(f"{path} is neither a PyTorch zip archive nor a legacy torch.save file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UnsafeCheckpointError(found.group(1) if found else "an unsupported global", path) from None
