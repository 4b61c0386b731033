"""Tokenizer throughput: runs the tokenizer benchmark (`bench/tokenizer.py`) in the peers' environment.

That script tokenizes the first 10,000 captions of the pictext shards with clipforge, OpenAI's
`clip.tokenize`, instant-clip-tokenizer and HF's CLIPTokenizerFast, interleaved, in three situations: cold
(fresh tokenizer), primed (caches hold the other captions: a training run's steady state) and warm (the same
captions again). It also checks every output row against OpenAI's. Here its JSON becomes rows in captions
per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench.envs import ROOT, SHARED_BPE, Pool
from bench.pipeline import SHARD
from bench.results import Row
from bench.timing import Stats

# The script's contender names -> the suite's contender keys.
KEYS = {
    "clipforge": "clipforge",
    "openai clip.tokenize": "openai",
    "instant-clip-tokenizer": "instant",
    "HF CLIPTokenizerFast": "hf",
}
SITUATIONS = {
    "primed": "primed (steady state)",
    "cold": "cold (fresh tokenizer)",
    "warm": "warm (same captions)",
}


def run(pool: Pool, captions: int = 10_000) -> list[Row]:
    s = pool.settings
    env = dict(os.environ)
    if SHARED_BPE.exists():
        env.setdefault("CLIPFORGE_BPE_PATH", str(SHARED_BPE))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokenizer.json"
        command = [s.python("peers"), str(ROOT / "bench" / "tokenizer.py"), "--n", str(captions)]
        command += ["--data", str(SHARD.parent)]
        command += ["--repeats", str(s.reps), "--json", str(out)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"bench/tokenizer.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
        data = json.loads(out.read_text())
    n = data["captions"]
    identical = {KEYS[name]: c["rows_differing_from_openai"] == 0 for name, c in data["contenders"].items()}
    rows = []
    for situation, label in SITUATIONS.items():
        results = {
            KEYS[name]: Stats.of([n / t for t in c[f"{situation}_runs_wall_s"]])
            for name, c in data["contenders"].items()
        }
        note = "outputs identical to OpenAI's: " + ", ".join(k for k, same in identical.items() if same)
        row = Row("tokenizer", f"{n:,} captions -> [N, 77], {label}", "captions/s", results, note=note)
        row.extra["stages_ms"] = {k: data[k] for k in ("clipforge_stages_ms", "openai_stages_ms")}
        rows.append(row)
        print(row.brief(), flush=True)
    return rows
