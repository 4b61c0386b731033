"""A faiss index over an embeddings directory, with the metadata to turn hits into paths and captions.

    INDEX/index.json            model, dim, count, the index kind and its parameters, recall, sources
    INDEX/index-00000.faiss     the vectors (faiss format); row r of the index is hit id r
    INDEX/items-00000.parquet   path, caption, shard, offset, size of rows 0..n0-1; items-00001 the next...

The vectors are L2-normalized, so inner product is cosine similarity. Below `exact_below` vectors the
index is exact (IndexFlatIP: every query scores every vector). Above it, IVF-Flat: k-means cells
(`nlist` = 4 * sqrt(N), trained on a sample of up to 64 vectors a cell), each query scoring the vectors
of its `nprobe` nearest cells, stored uncompressed. `nprobe` is the smallest power of two whose recall@10
against exact search, measured on a sample of the indexed vectors as queries, reaches `target_recall`;
the recall is printed and recorded. Adding parts (`add_to_index`) appends rows and a metadata file and
keeps the cells: no retraining, ids continue. index.json is written last, so an interrupted add leaves
the index as it was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.apps import embeddings as store

META = "index.json"
EXACT_BELOW = 100_000  # vectors; an exact query then scores 100,000 x dim products (~5 ms at dim 512)
TARGET_RECALL = 0.95
RECALL_QUERIES = 1_000
MAX_IMAGE_BYTES = 64 * 2**20  # image_bytes returns None above this (a thumbnail source, not an archive)
_COLUMNS = ["path", "caption", "shard", "offset", "size"]


@dataclass(frozen=True)
class Hit:
    id: int  # the row in the index
    score: float  # inner product of normalized vectors: cosine similarity
    path: str  # a file path or a shard key
    caption: str  # "" when the item had none


def _faiss():
    try:
        import faiss
    except ImportError:  # an optional dependency: say how to get it
        raise ValueError("faiss is not installed: pip install 'clipforge[apps]' (or faiss-cpu)") from None
    return faiss


class SearchIndex:
    """An index opened from disk: `.search(queries, k)` gives hits with their paths and captions."""

    def __init__(self, path: Path, meta: dict[str, Any], index: Any, items: pa.Table) -> None:
        self.path, self.meta, self.index, self.items = path, meta, index, items

    dim = property(lambda self: int(self.meta["dim"]))
    model = property(lambda self: str(self.meta["model"]))
    count = property(lambda self: int(self.meta["count"]))

    @classmethod
    def open(cls, path: str | Path) -> SearchIndex:
        """Load the index and its metadata; ValueError with one line when it is missing or inconsistent."""
        path = Path(path)
        meta = _read_meta(path)
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path / meta["faiss"]))
            items = pa.concat_tables([pq.read_table(path / name, columns=_COLUMNS) for name in meta["items"]])
        except (RuntimeError, OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: unreadable index ({str(e).splitlines()[0]})") from None
        if index.ntotal != meta["count"] or items.num_rows != meta["count"] or index.d != meta["dim"]:
            raise ValueError(
                f"{path}: inconsistent index ({index.ntotal} vectors of dim {index.d}, {items.num_rows} "
                f"metadata rows, index.json says {meta['count']} of dim {meta['dim']})"
            )
        if meta["kind"] == "ivf":
            faiss.extract_index_ivf(index).nprobe = int(meta["params"]["nprobe"])
        return cls(path, meta, index, items.combine_chunks())

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The `k` best hits of each query, best first; `queries` (Q, dim) float32, L2-normalized."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, ids = self.index.search(queries, min(k, self.count))
        found = ids[ids >= 0]
        rows = self.items.select(["path", "caption"]).take(pa.array(found, pa.int64())).to_pydict()
        hits, n = [], 0
        for q_scores, q_ids in zip(scores, ids, strict=True):
            hits.append([])
            for score, i in zip(q_scores, q_ids, strict=True):
                if i >= 0:
                    hits[-1].append(Hit(int(i), float(score), rows["path"][n], rows["caption"][n]))
                    n += 1
        return hits

    def image_bytes(self, hit: Hit) -> bytes | None:
        """The original image's bytes (a local file, or a member of a local tar shard), or None."""
        if not 0 <= hit.id < self.count:
            return None
        row = self.items.slice(hit.id, 1).to_pylist()[0]
        file, offset, size = (
            (row["shard"], row["offset"], row["size"]) if row["shard"] else (row["path"], 0, -1)
        )
        if not file:  # a text item
            return None
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size if size < 0 else size
                if size > MAX_IMAGE_BYTES:
                    return None
                f.seek(offset)
                data = f.read(size)
        except OSError:  # moved, deleted or unreadable since it was embedded
            return None
        return data if len(data) == size else None


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no {META}: not a search index (build one with clipforge index)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / META}: unreadable ({e})") from None
    missing = [
        f for f in ("model", "dim", "count", "kind", "params", "faiss", "items", "sources") if f not in meta
    ]
    if missing:
        raise ValueError(f"{path / META}: not a search index's metadata (missing {missing})")
    return meta


def build_index(
    embeddings_dir: str | Path,
    out_path: str | Path,
    *,
    exact_below: int = EXACT_BELOW,
    nlist: int | None = None,
    nprobe: int | None = None,
    target_recall: float = TARGET_RECALL,
    recall_queries: int = RECALL_QUERIES,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> SearchIndex:
    """Index the finished parts of `embeddings_dir` into the new directory `out_path` (see the module)."""
    out = Path(out_path)
    if (out / META).exists():
        raise ValueError(f"{out} already holds an index: add parts with --add, or choose a new --out")
    manifest, parts = _new_parts(embeddings_dir, set(), log)
    vectors, items = _read_parts(embeddings_dir, parts)
    if len(vectors) == 0:
        raise ValueError(f"{embeddings_dir}: no embedded items to index")
    faiss = _faiss()
    n, dim = vectors.shape
    if n < exact_below:
        index, kind, params, recall = faiss.IndexFlatIP(dim), "flat", {}, 1.0
        index.add(vectors)
        log(f"exact index (IndexFlatIP): {n:,} vectors of dim {dim}")
    else:
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 points a cell
        index, params, kind = *_train_ivf(faiss, vectors, nlist, seed), "ivf"
        index.add(vectors)
        queries = vectors[np.random.default_rng(seed).choice(n, min(recall_queries, n), replace=False)]
        params["nprobe"], recall = _choose_nprobe(faiss, index, vectors, queries, nprobe, target_recall)
        params["recall_queries"] = len(queries)
        log(
            f"approximate index (IVF-Flat, nlist {nlist}, nprobe {params['nprobe']}): "
            f"{n:,} vectors of dim {dim}"
        )
        log(f"recall@10 vs exact search on {len(queries):,} of the vectors as queries: {recall:.3f}")
    meta = {
        "format": 1,
        "model": manifest["model"],
        "int8": manifest["int8"],
        "modality": manifest["kind"],
        "dim": dim,
        "count": 0,
        "kind": kind,
        "params": params,
        "recall_at_10": recall,
        "faiss": "",
        "items": [],
        "sources": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    _commit(out, meta, index, items, embeddings_dir, manifest, parts)
    return SearchIndex.open(out)


def add_to_index(
    index_path: str | Path, embeddings_dir: str | Path, log: Callable[[str], None] = print
) -> SearchIndex:
    """Add the parts of `embeddings_dir` the index does not hold yet: rows appended, ids continue."""
    index = SearchIndex.open(index_path)
    meta = index.meta
    manifest = store.read_manifest(embeddings_dir)
    if manifest["dim"] != index.dim or manifest["model"] != index.model or manifest["int8"] != meta["int8"]:
        theirs = (
            f"{manifest['dim']}-d vectors of {manifest['model']!r}{' (int8)' if manifest['int8'] else ''}"
        )
        ours = f"{index.dim}-d vectors of {index.model!r}{' (int8)' if meta['int8'] else ''}"
        raise ValueError(f"{embeddings_dir} holds {theirs}; the index holds {ours}")
    source = meta["sources"].get(_source_key(embeddings_dir, manifest), {"parts": []})
    _, parts = _new_parts(embeddings_dir, set(source["parts"]), log)
    vectors, items = _read_parts(embeddings_dir, parts)
    if len(vectors) == 0:
        log(f"nothing to add: the index holds every finished part of {embeddings_dir}")
        return index
    index.index.add(vectors)
    _commit(index.path, meta, index.index, items, embeddings_dir, manifest, parts)
    log(f"added {len(vectors):,} vectors from {len(parts)} part(s): {meta['count']:,} in the index")
    return SearchIndex.open(index.path)


def _source_key(embeddings_dir: str | Path, manifest: dict[str, Any]) -> str:
    return f"{os.path.abspath(embeddings_dir)}#{manifest['fingerprint']}"


def _new_parts(
    embeddings_dir: str | Path, indexed: set[str], log: Callable[[str], None]
) -> tuple[dict[str, Any], list[str]]:
    manifest = store.read_manifest(embeddings_dir)
    parts = [name for name in manifest["parts"] if name not in indexed]
    waiting = store.part_count(manifest["items"], manifest["part_size"]) - len(manifest["parts"])
    if waiting:
        log(f"{embeddings_dir}: {waiting} part(s) not embedded yet; add them later with --add")
    return manifest, parts


def _read_parts(embeddings_dir: str | Path, parts: list[str]) -> tuple[np.ndarray, pa.Table | None]:
    read = [store.read_part(embeddings_dir, name) for name in parts]
    if not read:
        return np.zeros((0, 0), np.float32), None
    return np.concatenate([v for v, _ in read]), pa.concat_tables([t.select(_COLUMNS) for _, t in read])


def _train_ivf(faiss: Any, vectors: np.ndarray, nlist: int, seed: int) -> tuple[Any, dict[str, Any]]:
    n, dim = vectors.shape
    train = vectors[np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # k-means initialization: the same cells on every build
    index.train(train)
    return index, {"nlist": nlist, "train_size": len(train), "seed": seed}


def _choose_nprobe(
    faiss: Any, index: Any, vectors: np.ndarray, queries: np.ndarray, nprobe: int | None, target: float
) -> tuple[int, float]:
    """The given nprobe, or the smallest power of two (up to nlist) reaching `target`; with its recall."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    k = min(10, len(vectors))
    _, truth = exact.search(queries, k)
    ivf = faiss.extract_index_ivf(index)
    candidates = [nprobe] if nprobe else [2**i for i in range(int(math.log2(ivf.nlist)) + 1)] + [ivf.nlist]
    for probe in candidates:
        ivf.nprobe = probe
        recall = recall_at_k(index.search(queries, k)[1], truth)
        if recall >= target:
            break
    return probe, recall


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k (rows of `truth`) that `found` holds."""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def _commit(
    out: Path,
    meta: dict[str, Any],
    index: Any,
    items: pa.Table,
    embeddings_dir: str | Path,
    manifest: dict[str, Any],
    parts: list[str],
) -> None:
    """Write the new rows' metadata and the index under new names, then index.json, then drop the old."""
    faiss = _faiss()
    generation = len(meta["items"])
    items_name, faiss_name, old = (
        f"items-{generation:05d}.parquet",
        f"index-{generation:05d}.faiss",
        meta["faiss"],
    )
    pq.write_table(items, out / items_name)
    faiss.write_index(index, str(out / faiss_name))
    source = meta["sources"].setdefault(_source_key(embeddings_dir, manifest), {"parts": []})
    source["parts"] = sorted({*source["parts"], *parts})
    meta.update(count=int(index.ntotal), faiss=faiss_name, items=[*meta["items"], items_name])
    tmp = out / f"{META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / META)
    if old and old != faiss_name:
        (out / old).unlink(missing_ok=True)
