"""clipforge's benchmark suite against OpenCLIP, HF transformers and OpenAI's clip, in one run.

    bench/setup_env.sh /path/to/benchenv   # once: the peers' environment ($CLIPFORGE_BENCH_ENV, ../benchenv)
    python -m bench all --peers-env /path/to/benchenv --out docs/benchmarks.md
    python -m bench encode train --quick   # some families, fewer cases and repetitions
    python -m bench --from-json docs/benchmarks.json --out docs/benchmarks.md   # re-render, no measuring

On an idle 2-core machine: about 16 min; --quick about 4 min; --complete (every bf16 cell) about 30 min.
bench/gpu.sh runs it on a CUDA GPU.

Families: peak (matmul peak; run first for "% of peak"), encode, train, memory, data, tokenizer. Results are
written as markdown tables with a PNG and the raw repetitions in JSON beside it, or printed without --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

from bench import encoding, machine, peak, pipeline, report, tokenizing, training
from bench.envs import CLIPFORGE, CONTENDERS, DEFAULT_PEERS_ENV, PEERS, ROOT, Pool, Settings
from bench.results import Row
from bench.timing import Stats

FAMILIES = {
    "peak": peak.run,
    "encode": encoding.run,
    "train": training.run,
    "memory": training.run_memory,
    "data": pipeline.run,
    "tokenizer": tokenizing.run,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    names = ", ".join(["all", *FAMILIES])
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"of {names} (default: all)")
    parser.add_argument("--out", type=Path, help="write the markdown here (plus .png and .json beside it)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--quick", action="store_true", help="fewer cases and contenders, 3 repetitions (~4 min)"
    )
    scope.add_argument("--complete", action="store_true", help="every bf16 cell too (~30 min on 2 cores)")
    parser.add_argument("--peers-env", type=Path, default=DEFAULT_PEERS_ENV, help="from bench/setup_env.sh")
    parser.add_argument(
        "--ours-python", default=sys.executable, help="clipforge's interpreter (default: this)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, all libraries")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (see bench/gpu.sh)")
    parser.add_argument("--reps", type=int, help="timed repetitions per case (default 5; 3 with --quick)")
    keys = ",".join(c.key for c in CONTENDERS)
    parser.add_argument("--contenders", help=f"comma-separated, of {keys} (default: all; --quick: 3)")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--from-json", type=Path, help="measure nothing: rewrite --out from a report's JSON")
    args = parser.parse_args(argv)
    unknown = set(args.families) - {"all", *FAMILIES}
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}: choose from {names}")
    return args


def facts(settings: Settings, envs: dict, started: float, loads: list, durations: dict) -> dict:
    """What the report says about the run, as data (the JSON keeps it; `report` turns it into prose)."""
    return {
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "ours_python": settings.ours_python,
        "peers_env": str(settings.peers_env),
        "finished": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "seconds": time.time() - started,
        "seconds_by_family": durations,
        "commit": machine.git_commit(ROOT),
        "cpu": machine.cpu(),
        "load_average": loads,
        "settings": {
            k: getattr(settings, k) for k in ("threads", "device", "reps", "warmup_s", "rep_s", "scope")
        },
        "environments": envs,
        "peak_gflops": envs.get("peak"),
    }


def merge_peak(rows: list[Row], again: list[Row]) -> list[Row]:
    """The peak rows with the repetitions of both measurements (start and end of the run) pooled."""
    later = {row.case: row for row in again}
    for row in rows:
        if row.family == "peak" and row.case in later:
            for key, stats in later[row.case].results.items():
                if key in row.results:
                    row.results[key] = Stats.of([*row.results[key].samples, *stats.samples])
            row.note = (
                row.note + "; " if row.note else ""
            ) + "measured at the start and at the end of the run"
    return rows


def make_settings(args: argparse.Namespace) -> Settings:
    scope = "quick" if args.quick else "complete" if args.complete else "default"
    settings = Settings(args.peers_env, args.ours_python, args.threads, args.device, scope=scope)
    settings.verbose = args.verbose
    if args.contenders or args.quick:
        chosen = (args.contenders or "clipforge,openclip,hf").split(",")
        settings.contenders = tuple(c.key for c in CONTENDERS if c.key in chosen)
    settings.reps = args.reps or (3 if args.quick else 5)
    if args.quick or args.device.startswith("cuda"):  # GPU calls are short: less is needed to time them
        settings.warmup_s, settings.rep_s = 0.5, 0.2
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.from_json:
        rows, meta = report.from_json(args.from_json)
        for path in report.write(rows, meta, args.out or args.from_json.with_suffix(".md")):
            print(f"wrote {path}")
        return 0
    chosen = args.families or ["all"]
    families = list(FAMILIES) if "all" in chosen else list(dict.fromkeys(chosen))
    if {"encode", "train"} & set(families) and "peak" not in families:
        families.insert(0, "peak")  # "% of peak" needs it
    settings = make_settings(args)
    if not Path(settings.python("peers")).exists():
        print(f"no peers' environment at {settings.peers_env}: run bench/setup_env.sh (or pass --peers-env)")
        return 2
    started, loads = time.time(), [os.getloadavg()[0]]
    pool = Pool(settings)
    rows, durations, failed = [], {}, {}

    def save(final: bool) -> None:
        """The report of the rows so far: a run stopped by a time limit keeps its finished families."""
        if any(r.family == "peak" for r in rows):
            envs["peak"] = peak.peak_gflops(rows)
        meta = {**facts(settings, envs, started, loads, durations), "failed": failed}
        if not final:
            meta["unfinished"] = [f for f in families if f not in durations]
        if args.out:
            for path in report.write(rows, meta, args.out):
                print(f"wrote {path}" if final else f"   (so far: {path})", flush=True)
        elif final:
            print(report.markdown(rows, meta, None))

    try:
        envs = {
            "ours": pool.run(CLIPFORGE, "bench.machine:environment", libs=["clipforge"]),
            "peers": pool.run(
                PEERS[0], "bench.machine:environment", libs=["openclip", "hf", "openai", "instant"]
            ),
        }
        for family in families:
            print(f"== {family}", flush=True)
            start = time.time()
            try:
                rows += FAMILIES[family](pool)
            except Exception as exc:  # one family's failure (a missing file, a crash) keeps the others
                failed[family] = f"{type(exc).__name__}: {exc}"
                print(f"   FAILED: {failed[family]}", flush=True)
            durations[family] = time.time() - start
            loads.append(os.getloadavg()[0])
            print(f"   {durations[family]:.0f} s, load average {loads[-1]:.2f}", flush=True)
            if family != families[-1]:
                save(final=False)
        if "peak" in families and len(families) > 1:  # again at the end: the machine's speed drifts
            print("== peak, again", flush=True)
            rows = merge_peak(rows, peak.run(pool))
    finally:
        pool.close()
    save(final=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
