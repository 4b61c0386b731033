"""The embeddings directory: Parquet parts and the manifest that says what they hold.

    out/manifest.json        the plan (model, dim, dtype, source, items, part size) and the finished parts
    out/part-00000.parquet   items [0, part_size): one row per embedded item
    out/part-00001.parquet   items [part_size, 2 * part_size) ...

A part row: `id` (the item's place in the source listing, stable across runs and ranks), `path` (a file
path, or a shard key), `caption` ("" when none), `shard`, `offset`, `size` (where a shard member's bytes
are; "", 0, -1 for a file or a text), `embedding` (fixed-size list of float16 or float32, L2-normalized).
Items that could not be embedded have no row; each part counts them by reason.

A part is written to a temporary name and renamed, so a part file is always whole. The manifest is updated
after each part under an exclusive lock (`fcntl.flock`), so several processes (torchrun ranks) can finish
parts of one directory at once. A process killed between the rename and the manifest update leaves a part
the manifest lacks: the next run adopts it from the summary the part carries in its own Parquet metadata.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
PART_NAME = re.compile(r"part-(\d{5,})\.parquet")
_SUMMARY_KEY = b"clipforge.part"  # the part's manifest entry, in its Parquet key-value metadata
# The plan's fields: a later run (or another rank) may continue a directory only when all of these agree.
PLAN_FIELDS = ("kind", "model", "int8", "dim", "dtype", "source", "items", "part_size", "fingerprint")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def part_count(items: int, part_size: int) -> int:
    return (items + part_size - 1) // part_size


def part_table(
    ids: np.ndarray,
    vectors: np.ndarray,
    paths: list[str],
    captions: list[str],
    shards: list[str],
    offsets: list[int],
    sizes: list[int],
) -> pa.Table:
    """One part's rows; `vectors` (N, dim) already L2-normalized, in the dtype to store."""
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "path": pa.array(paths, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "shard": pa.array(shards, pa.string()),
            "offset": pa.array(offsets, pa.int64()),
            "size": pa.array(sizes, pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        }
    )


def write_part(out_dir: Path, name: str, table: pa.Table, summary: dict[str, Any]) -> None:
    """Write part `name` atomically (temporary file, fsync, rename), its `summary` in its metadata."""
    metadata = {**(table.schema.metadata or {}), _SUMMARY_KEY: json.dumps(summary).encode()}
    tmp = out_dir / f"{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        pq.write_table(table.replace_schema_metadata(metadata), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / name)


def part_summary(path: Path) -> dict[str, Any]:
    """The summary a part carries (its manifest entry), read from the Parquet footer only."""
    metadata = pq.read_schema(path).metadata or {}
    if _SUMMARY_KEY not in metadata:
        raise ValueError(f"{path}: not a clipforge embeddings part (no {_SUMMARY_KEY.decode()} metadata)")
    return json.loads(metadata[_SUMMARY_KEY])


def remove_stale_temporaries(out_dir: Path, names: set[str]) -> None:
    """Delete the half-written temporaries of parts `names` (left by a killed process)."""
    for path in out_dir.glob("part-*.parquet.tmp-*"):
        if path.name.split(".tmp-")[0] in names:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the directory's manifest lock: one process at a time reads and rewrites the manifest."""
    with open(out_dir / "manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of an embeddings directory; ValueError with one line when there is none or it is bad."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{out_dir}: no {MANIFEST}: not an embeddings directory (run clipforge embed)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    missing = [f for f in (*PLAN_FIELDS, "parts") if f not in manifest]
    if missing or manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a clipforge embeddings manifest (missing {missing or 'format 1'})")
    return manifest


def open_plan(out_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The manifest for `plan`: created, or continued when the directory already holds the same plan.

    Parts on disk the manifest lacks are adopted. Call under `locked`."""
    if not (out_dir / MANIFEST).exists():
        manifest = {"format": FORMAT_VERSION, **plan, "parts": {}}
    else:
        manifest = read_manifest(out_dir)
        differ = [f for f in PLAN_FIELDS if manifest[f] != plan[f]]
        if differ:
            shown = ", ".join(f"{f} {manifest[f]!r} there, {plan[f]!r} now" for f in differ[:2])
            raise ValueError(f"{out_dir} holds embeddings of another run ({shown}): use a new --out")
    for path in sorted(out_dir.glob("part-*.parquet")):
        if PART_NAME.fullmatch(path.name) and path.name not in manifest["parts"]:
            manifest["parts"][path.name] = part_summary(path)
    write_manifest(out_dir, manifest)
    return manifest


def record_part(out_dir: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Add a finished part to the manifest (under the lock); the updated manifest."""
    with locked(out_dir):
        manifest = read_manifest(out_dir)
        manifest["parts"][name] = summary
        write_manifest(out_dir, manifest)
    return manifest


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    parts = manifest["parts"]
    manifest["parts"] = dict(sorted(parts.items()))
    manifest["count"] = sum(p["count"] for p in parts.values())
    manifest["skipped"] = dict(
        sorted(sum((Counter(p["skipped"]) for p in parts.values()), Counter()).items())
    )
    manifest["complete"] = len(parts) == part_count(manifest["items"], manifest["part_size"])
    tmp = out_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)


def read_part(out_dir: str | Path, name: str) -> tuple[np.ndarray, pa.Table]:
    """(vectors (N, dim) float32, the part's other columns) of part `name`."""
    table = pq.read_table(Path(out_dir) / name)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = np.asarray(column.flatten(), dtype=np.float32).reshape(-1, dim)
    return vectors, table.drop_columns(["embedding"])


def read_embeddings(out_dir: str | Path) -> tuple[np.ndarray, pa.Table]:
    """All finished parts of a directory, in part order: (vectors (N, dim) float32, metadata columns)."""
    manifest = read_manifest(out_dir)
    parts = [read_part(out_dir, name) for name in manifest["parts"]]
    if not parts:
        return np.zeros((0, manifest["dim"]), np.float32), pa.table({})
    return np.concatenate([v for v, _ in parts]), pa.concat_tables([t for _, t in parts])
