"""Tokenizer benchmark: clipforge against OpenAI's `clip.tokenize`, side by side, on real captions.

Needs OpenAI's reference code, so it runs in an environment that has it (`clip-anytorch`; optionally
`instant-clip-tokenizer` and `transformers` for the extra contenders). clipforge is imported from this
checkout's src/ and needs only torch, numpy, tokenizers, ftfy, regex and pyarrow there (the reference
environment of docs/parity.md, made by bench/setup_env.sh). From the repository root:

    CLIPFORGE_BPE_PATH=/path/to/bpe_simple_vocab_16e6.txt.gz \\
        $CLIPFORGE_BENCH_ENV/bin/python bench/tokenizer.py --data ../shared/data/pictext --n 10000

--data defaults to shared/data/pictext beside the checkout.

Each contender turns the same N captions (`{key}.txt` of the webdataset shards) into an [N, 77] array,
truncate on, in three situations, each on a freshly built tokenizer (build time not counted):
  cold    the first call: every cache empty;
  primed  after tokenizing the other captions of the shards: caches hold common words, not these captions
          (a training run's steady state);
  warm    the same batch a second time.
Each contender first tokenizes 1,000 of the other captions once, untimed, so that one-time process costs
(lazy imports, library set-up: ~0.1-0.2 s for clipforge's first call in a process) are not counted as a
tokenizer's; "cold" still means a freshly built tokenizer with empty caches. Contenders run interleaved, so
a busy machine slows all of them alike; medians are reported and ratios are ratios of medians. Wall-clock
and process CPU time are both recorded (the JSON has every run). clipforge's time is also split into its
stages, next to OpenAI's. Every output is compared with OpenAI's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clipforge.tokenizer import ClipTokenizer, load_openai_merges
from clipforge.tokenizer.chunks import distinct, gather_ids
from clipforge.tokenizer.core import _pack
from clipforge.tokenizer.vocab import build_vocab

CONTEXT = 77
SITUATIONS = ("cold", "primed", "warm")


def load_captions(data: Path) -> list[str]:
    """Every caption of the train shards, in shard and member order."""
    captions: list[str] = []
    for shard in sorted(data.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
    return captions


class Contender:
    """`make()` builds a fresh tokenizer; `run(tok, texts)` returns the [N, 77] int64 array."""

    def __init__(
        self, name: str, make: Callable[[], Any], run: Callable[[Any, list[str]], np.ndarray]
    ) -> None:
        self.name, self.make, self.run = name, make, run
        self.wall: dict[str, list[float]] = {s: [] for s in SITUATIONS}
        self.cpu: dict[str, list[float]] = {s: [] for s in SITUATIONS}
        self.output: np.ndarray | None = None

    def measure(self, situation: str, texts: list[str], others: list[str]) -> None:
        tok = self.make()
        if situation == "primed":
            self.run(tok, others)
        elif situation == "warm":
            self.run(tok, texts)
        wall, cpu = time.perf_counter(), time.process_time()
        output = self.run(tok, texts)
        self.wall[situation].append(time.perf_counter() - wall)
        self.cpu[situation].append(time.process_time() - cpu)
        if situation == "cold":
            self.output = output


def openai_contender() -> Contender:
    import clip
    from clip import clip as clip_module
    from clip.simple_tokenizer import SimpleTokenizer

    def make() -> Any:
        clip_module._tokenizer = SimpleTokenizer()  # clip.tokenize uses this module-level instance
        return clip_module._tokenizer

    return Contender(
        "openai clip.tokenize", make, lambda tok, t: clip.tokenize(t, CONTEXT, truncate=True).numpy()
    )


def clipforge_contender(merges: list[tuple[str, str]]) -> Contender:
    return Contender(
        "clipforge",
        lambda: ClipTokenizer(merges, name="openai"),
        lambda tok, texts: tok(texts, CONTEXT, truncate=True).numpy(),
    )


def instant_contender() -> Contender | None:
    try:
        import instant_clip_tokenizer
    except ImportError:
        return None
    return Contender(
        "instant-clip-tokenizer",
        instant_clip_tokenizer.Tokenizer,
        lambda tok, texts: tok.tokenize_batch(texts, CONTEXT).astype(np.int64),
    )


def hf_contender(merges: list[tuple[str, str]]) -> Contender | None:
    """HF's CLIP tokenizer (the Rust `tokenizers` pipeline), built in memory from OpenAI's merges."""
    try:
        from transformers import CLIPTokenizerFast
    except ImportError:
        return None
    vocab = build_vocab(merges)

    def run(tok: Any, texts: list[str]) -> np.ndarray:
        out = tok(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="np")
        ids = out["input_ids"].astype(np.int64)
        ids[out["attention_mask"] == 0] = 0  # HF pads with <|endoftext|>; compare with OpenAI's zeros
        return ids

    return Contender(
        "HF CLIPTokenizerFast", lambda: CLIPTokenizerFast(vocab=dict(vocab), merges=list(merges)), run
    )


def clipforge_stages(merges: list[tuple[str, str]], texts: list[str], warm: bool) -> dict[str, float]:
    """Where clipforge's time goes, in ms, by timing its internal steps on a fresh tokenizer."""
    tok = ClipTokenizer(merges, name="openai")
    if warm:
        tok(texts, truncate=True)
    spent = {"chunks": 0.0, "bpe": 0.0}

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[key] += time.perf_counter() - start

        return wrapper

    tok._words._encode_new = timed("bpe", tok._words._encode_new)  # type: ignore[method-assign]
    tok._chunks._encode_new = timed("chunks", tok._chunks._encode_new)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    cleaned = tok._cleaned_texts(texts)
    t1 = time.perf_counter()
    lowered = pc.ascii_lower(pa.array(cleaned, pa.string()))
    chunks, which, per_text = distinct(pc.ascii_split_whitespace(lowered))
    t2 = time.perf_counter()
    found = tok._chunks.lookup(chunks)
    t3 = time.perf_counter()
    ids, counts = gather_ids(found, which, per_text)
    torch.from_numpy(_pack(ids.astype(np.int64), counts, CONTEXT, tok.sot_token_id, tok.eot_token_id))
    t4 = time.perf_counter()
    return {
        "find texts needing ftfy + clean them": (t1 - t0) * 1e3,
        "Arrow: lowercase, split, distinct chunks": (t2 - t1) * 1e3,
        "distinct chunks: cache lookups": (t3 - t2 - spent["chunks"]) * 1e3,
        "new chunks: Arrow regex + words": (spent["chunks"] - spent["bpe"]) * 1e3,
        "new words: Rust BPE": spent["bpe"] * 1e3,
        "gather ids + tensor fill": (t4 - t3) * 1e3,
    }


def openai_stages(texts: list[str]) -> dict[str, float]:
    """OpenAI's time on a fresh tokenizer split the same way, in ms: cleaning, regex + BPE, tensor fill."""
    from clip.simple_tokenizer import SimpleTokenizer, basic_clean, whitespace_clean

    t0 = time.perf_counter()
    for text in texts:
        whitespace_clean(basic_clean(text)).lower()
    t1 = time.perf_counter()
    tok = SimpleTokenizer()
    t2 = time.perf_counter()
    rows = [[49406, *tok.encode(text), 49407][:CONTEXT] for text in texts]  # encode cleans again
    t3 = time.perf_counter()
    result = torch.zeros(len(rows), CONTEXT, dtype=torch.long)  # as clip.tokenize fills it
    for i, row in enumerate(rows):
        result[i, : len(row)] = torch.tensor(row)
    t4 = time.perf_counter()
    clean = t1 - t0
    return {"clean": clean * 1e3, "regex + BPE": (t3 - t2 - clean) * 1e3, "tensor fill": (t4 - t3) * 1e3}


def min_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: min(run[key] for run in runs) for key in runs[0]}


def report(contenders: list[Contender], n: int) -> dict[str, Any]:
    """Print and return medians and speedups over OpenAI's, for wall-clock and for process CPU time."""
    openai, reference = contenders[0], contenders[0].output
    assert reference is not None
    table: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        header = " ".join(f"{s + ' ms':>10s} {'x':>5s}" for s in SITUATIONS)
        print(f"{clock + ' time':24s} {header} {'us/caption':>10s}  rows != OpenAI")
        for c in contenders:
            differing = int((c.output != reference).any(axis=1).sum())
            row = table.setdefault(c.name, {"rows_differing_from_openai": differing})
            cells = []
            for s in SITUATIONS:
                ms = statistics.median(getattr(c, clock)[s]) * 1e3
                speedup = statistics.median(getattr(openai, clock)[s]) * 1e3 / ms
                row[f"{s}_{clock}_ms"], row[f"{s}_{clock}_speedup"] = ms, speedup
                row[f"{s}_runs_{clock}_s"] = getattr(c, clock)[s]  # key names read by bench/tokenizing.py
                cells.append(f"{ms:10.1f} {speedup:5.1f}")
            us = row[f"primed_{clock}_ms"] / n * 1e3
            print(f"{c.name:24s} {' '.join(cells)} {us:10.2f}  {differing}")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # The pictext shards of the shared folder beside the checkout.
    pictext = Path(__file__).resolve().parents[2] / "shared" / "data" / "pictext"
    parser.add_argument("--data", type=Path, default=pictext)
    parser.add_argument("--n", type=int, default=10000, help="captions in the batch (the rest prime caches)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender and situation")
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args()

    captions = load_captions(args.data)
    texts, others = captions[: args.n], captions[args.n :]
    merges = load_openai_merges()
    found = (openai_contender(), clipforge_contender(merges), instant_contender(), hf_contender(merges))
    contenders = [c for c in found if c is not None]
    load_before = os.getloadavg()[0]
    for c in contenders:  # once, untimed: one-time process costs (lazy imports, library set-up) stay out
        c.run(c.make(), others[:1000])
    for _ in range(args.repeats):
        for situation in SITUATIONS:
            for c in contenders:
                c.measure(situation, texts, others)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load average {load_before:.1f}"
    machine += f" -> {os.getloadavg()[0]:.1f}, Python {platform.python_version()}, torch {torch.__version__}"
    print(f"{len(texts)} captions ({sum(not t.isascii() for t in texts)} non-ASCII); {len(others)} prime")
    print(machine)
    results: dict[str, Any] = {"machine": machine, "captions": len(texts), "prime_captions": len(others)}
    results["contenders"] = report(contenders, len(texts))
    results["clipforge_stages_ms"] = {
        "cold": min_of([clipforge_stages(merges, texts, warm=False) for _ in range(args.repeats)]),
        "warm": min_of([clipforge_stages(merges, texts, warm=True) for _ in range(args.repeats)]),
    }
    results["openai_stages_ms"] = {"cold": openai_stages(texts)}
    for who in ("clipforge_stages_ms", "openai_stages_ms"):
        for situation, stages in results[who].items():
            print(f"{who} {situation}: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    identical = results["contenders"]["clipforge"]["rows_differing_from_openai"] == 0
    print("clipforge output identical to OpenAI's:", identical)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
