"""The report: markdown tables (each contender's median [min-max], ratios, % of peak), a PNG, and raw JSON.

Ratios are clipforge's advantage over a peer from the medians: throughput ours / theirs, memory theirs /
ours; above 1 means clipforge is better. "% of peak" is a row's FLOP rate (counted FLOPs per item x items/s)
over the machine's peak, the best measured `torch.mm` rate of any precision and environment.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import encoding, peak, pipeline, tokenizing, training
from bench.envs import CONTENDERS
from bench.results import Row
from bench.timing import Stats

LABELS = {c.key: c.label for c in CONTENDERS} | {"instant": "instant-clip-tokenizer"}
ORDER = ["clipforge", "openclip", "hf", "openai", "instant", "clipforge_peer_torch"]
OURS = "clipforge"

INTRO = (
    "Measured by the suite in `bench/`: clipforge side by side with OpenCLIP, HF transformers and "
    "OpenAI's `clip`. Numbers are reported, never asserted in tests. To reproduce: `bench/setup_env.sh` (the "
    "peers' environment), then `python -m bench all --out docs/benchmarks.md` from clipforge's venv "
    "(`--quick` for a ~4-minute check; `bench/gpu.sh` for a CUDA GPU). `--from-json docs/benchmarks.json` "
    "rewrites this page from the stored repetitions without measuring."
)
SECTIONS = {
    "encode": "Image and text encoding",
    "train": "Training step",
    "memory": "Training memory vs batch size",
    "data": "Data pipeline (one process = one worker)",
    "tokenizer": "Tokenizer",
    "peak": "Matmul peak",
}


def _unwrap(text: str) -> str:
    """A docstring as markdown: paragraphs kept, the lines within them joined."""
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def family_notes() -> dict[str, str]:
    """The method of each family, as its module documents it."""
    modules = {"encode": encoding, "train": training, "data": pipeline, "tokenizer": tokenizing, "peak": peak}
    notes = {family: _unwrap(inspect.getdoc(module) or "") for family, module in modules.items()}
    notes["train"], _, memory = notes["train"].partition("\n\nMemory: ")
    notes["memory"] = memory[:1].upper() + memory[1:]
    return notes


def machine_lines(meta: dict) -> list[str]:
    """The "Machine and method" list, from the run's facts."""
    cpu, loads, s = meta["cpu"], meta["load_average"], meta["settings"]
    envs = meta["environments"]
    ours, peers = envs.get("ours", {}), envs.get("peers", {})
    libs = peers.get("libraries", {})
    # The suite's own threads count in the load: only more than that means other jobs were running.
    busy = (
        "other jobs were running, so absolute numbers are pessimistic and noisier (worst for small, "
        "multi-threaded calls); interleaving spreads that over all contenders"
        if loads[0] > 0.5 or max(loads) > s["threads"] + 0.5
        else f"the suite's own {s['threads']} threads and little else"
    )
    durations = ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("seconds_by_family", {}).items()) or "–"
    quick = " — **--quick: fewer cases and repetitions than the full suite**" if s["scope"] == "quick" else ""
    return [
        f"Command: `{meta['command']}` (clipforge's interpreter: `{meta['ours_python']}`; "
        f"peers' environment: `{meta['peers_env']}`)",
        f"Run: finished {meta['finished']}, {meta['seconds']:.0f} s ({durations}); commit {meta['commit']}",
        f"CPU: {cpu['model']}, {cpu['cores']} cores, {cpu.get('memory_gib', '?')} GiB; flags "
        f"{' '.join(cpu['flags']) or '?'}; **absent: {' '.join(cpu.get('missing_flags', [])) or 'none'}**"
        f" (torch's CPU capability: {ours.get('cpu_capability', '?')}). Without avx512_bf16/AMX, bf16 "
        "matmuls are converted in software and run slower than fp32 (see *Matmul peak*)",
        "Load average (1 min) before the start and after each family: "
        + " → ".join(f"{x:.2f}" for x in loads)
        + f", on {cpu['cores']} cores: {busy}",
        f"Threads: `torch.set_num_threads({s['threads']})` in every process; device {s['device']}"
        + (f" ({ours['gpu']})" if ours.get("gpu") else ""),
        f"clipforge: Python {ours.get('python', '?')}, torch {ours.get('torch', '?')}. Peers: Python "
        f"{peers.get('python', '?')}, torch {peers.get('torch', '?')}, open_clip_torch "
        f"{libs.get('openclip', '?')}, transformers {libs.get('hf', '?')}, clip-anytorch "
        f"{libs.get('openai', '?')}, instant-clip-tokenizer {libs.get('instant', '?')}. The torch builds "
        "differ, so clipforge also runs on the peers' torch (column *clipforge on the peers' torch*)",
        f"Repetitions: {s['reps']} timed per case and contender after ≥{s['warmup_s']:g} s of warm-up (a "
        f"repetition repeats short calls to last ≥{s['rep_s']:g} s); every contender runs in its own "
        "process, and they take turns repetition by repetition, in a rotating order. Cells: median "
        "[min–max]" + quick,
        "% of peak: FLOPs counted once per architecture on clipforge's model, over the best matmul rate "
        "measured (*Matmul peak* below gives both methods)"
        + (f"; peak here **{meta['peak_gflops']:,.0f} GFLOP/s**" if meta.get("peak_gflops") else ""),
        "Weights are random (no downloads); every library builds the same architecture with QuickGELU, as "
        "OpenAI's released models (parameter counts are compared: a mismatch would be flagged in a note)",
        *(f"**Not measured: {family}** ({why})" for family, why in meta.get("failed", {}).items()),
        *(
            [f"**Unfinished run** (saved after each family); not yet measured: {', '.join(unfinished)}"]
            if (unfinished := meta.get("unfinished"))
            else []
        ),
        *(
            [
                f"Contenders measured: {', '.join(LABELS[k] for k in s['contenders'])} "
                "(the tokenizer rows: all)"
            ]
            if len(s.get("contenders", LABELS)) < len(CONTENDERS)
            else []
        ),
    ]


def number(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def mfu(row: Row, stats: Stats, peak_gflops: float | None) -> float | None:
    if not row.flops_per_item or not peak_gflops:
        return None
    return stats.median * row.flops_per_item / (peak_gflops * 1e9)


def cell(row: Row, key: str, peak_gflops: float | None, precision: str = "") -> str:
    if key not in row.results:
        return "–"
    s = row.results[key]
    text = number(s.median) if s.low == s.high else f"{number(s.median)} [{number(s.low)}–{number(s.high)}]"
    if precision:
        text += f" {precision}"
    share = mfu(row, s, peak_gflops)
    return text + (f" · {share:.1%}" if share is not None else "")


def columns(rows: Iterable[Row]) -> list[str]:
    present = {k for row in rows for k in row.results}
    return [k for k in ORDER if k in present]


def best_precision(rows: list[Row]) -> list[tuple[Row, dict[str, str]]]:
    """Rows measured at several precisions merged: each contender's fastest, with the precision it used."""
    merged: dict[tuple[str, str], tuple[Row, dict[str, str]]] = {}
    for row in rows:
        if not row.best_of:
            continue
        key = (row.family, row.best_of)
        if key not in merged:
            merged[key] = (dataclasses.replace(row, results={}, precision="best"), {})
        best, used = merged[key]
        for k, s in row.results.items():
            if k not in best.results or s.median > best.results[k].median:
                best.results[k], used[k] = s, row.precision
    return list(merged.values())


def table(rows: list[Row], peak_gflops: float | None, precisions: list[dict[str, str]] | None = None) -> str:
    keys = columns(rows)
    peers = [k for k in keys if k not in (OURS, "clipforge_peer_torch")]
    show_precision = precisions is None and any(r.precision for r in rows)
    header = ["case", *(["precision"] if show_precision else []), *(LABELS[k] for k in keys)]
    header += [f"vs {LABELS[p]}" for p in peers if OURS in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        used = precisions[i] if precisions else {}
        cells = [f"{row.case} ({row.unit})"] + ([row.precision] if show_precision else [])
        cells += [cell(row, k, peak_gflops, used.get(k, "")) for k in keys]
        if OURS in keys:
            cells += [f"{r:.2f}×" if (r := row.ratio(OURS, p)) is not None else "–" for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({row.note for row in rows if row.note})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def peak_table(rows: list[Row], meta: dict) -> str:
    envs = meta.get("environments", {})
    ours, peers = envs.get("ours", {}).get("torch", "?"), envs.get("peers", {}).get("torch", "?")
    lines = [f"| matmul | ours (torch {ours}) | peers (torch {peers}) |", "|---|---|---|"]
    for row in rows:
        values = [cell(row, k, None) for k in ("clipforge", "clipforge_peer_torch")]
        lines.append(f"| {row.case} ({row.unit}) | " + " | ".join(values) + " |")
    note = f"- square matrices, the best size of each environment ({rows[0].note})" if rows else ""
    return "\n".join([*lines, "", note])


# A hand-written reading of the results, between these markers, survives when the report is regenerated.
FINDINGS = ("<!-- findings: kept when the report is regenerated -->", "<!-- /findings -->")


def kept_findings(previous: str) -> str:
    start, end = previous.find(FINDINGS[0]), previous.find(FINDINGS[1])
    if start < 0 or end < start:
        return ""
    return previous[start : end + len(FINDINGS[1])] + "\n"


def markdown(rows: list[Row], meta: dict, plot_name: str | None, findings: str = "") -> str:
    peak_rate = meta.get("peak_gflops")
    out = [f"# Benchmarks\n\n{INTRO}\n"]
    if findings:
        out.append(findings)
    out.append("## Machine and method\n\n" + "\n".join(f"- {line}" for line in machine_lines(meta)) + "\n")
    notes = family_notes()
    merged = best_precision(rows)
    if merged:
        out.append(
            "## Summary: each library at its best precision\n\n"
            "Throughput, median [min–max] over the repetitions, the precision that was fastest for that "
            "library, and · the share of the machine's matmul peak. `vs X`: clipforge's throughput over "
            "X's.\n"
        )
        out.append(table([r for r, _ in merged], peak_rate, [u for _, u in merged]) + "\n")
    if plot_name:
        out.append(f"![clipforge against its peers]({plot_name})\n")
    for family, title in SECTIONS.items():
        family_rows = [r for r in rows if r.family == family]
        if not family_rows:
            continue
        out.append(f"## {title}\n")
        out.append(notes[family] + "\n")
        out.append(
            (peak_table(family_rows, meta) if family == "peak" else table(family_rows, peak_rate)) + "\n"
        )
    return "\n".join(out)


COLORS = {
    "openclip": "tab:orange",
    "hf": "tab:green",
    "openai": "tab:purple",
    "instant": "tab:brown",
    "clipforge": "tab:blue",
    "clipforge_peer_torch": "tab:cyan",
}
PEERS = ["openclip", "hf", "openai", "instant"]


def plot(rows: list[Row], meta: dict, path: Path) -> None:
    """Three panels: speed ratios to each peer, training memory by batch size, share of the matmul peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ratio, ax_memory, ax_peak) = plt.subplots(1, 3, figsize=(18, 6.5), gridspec_kw={"wspace": 0.55})
    ratio_rows = [r for r, _ in best_precision(rows)]
    ratio_rows += [r for r in rows if r.family == "data" or (r.family == "tokenizer" and "primed" in r.case)]
    _plot_ratios(ax_ratio, ratio_rows)
    _plot_memory(ax_memory, [r for r in rows if r.family == "memory"])
    _plot_peak(ax_peak, [r for r in ratio_rows if r.flops_per_item], meta.get("peak_gflops"))
    envs, loads = meta["environments"], meta["load_average"]
    threads = meta["settings"]["threads"]
    title = (
        f"{meta['cpu']['model']}, {threads} threads, load {loads[0]:.1f}→{loads[-1]:.1f}; "
        f"clipforge torch {envs.get('ours', {}).get('torch', '?')}, "
        f"peers torch {envs.get('peers', {}).get('torch', '?')}"
    )
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _legend_below(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)


def _plot_ratios(ax: Any, ratio_rows: list[Row]) -> None:
    """clipforge's speed over each peer's (best precision), with the min-max range of the ratio."""
    height = 0.8 / len(PEERS)
    for j, peer in enumerate(PEERS):
        ys, xs, lo, hi = [], [], [], []
        for i, row in enumerate(ratio_rows):
            r = row.ratio(OURS, peer)
            if r is None:
                continue
            ours, theirs = row.results[OURS], row.results[peer]
            ys.append(i + (j - (len(PEERS) - 1) / 2) * height)
            xs.append(r)
            lo.append(r - ours.low / theirs.high)
            hi.append(ours.high / theirs.low - r)
        if xs:
            ax.barh(ys, xs, height, xerr=[lo, hi], color=COLORS[peer], label=LABELS[peer], capsize=2)
    ax.axvline(1, color="black", lw=0.8)
    ax.set_yticks(range(len(ratio_rows)), [f"{r.case}" for r in ratio_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("clipforge throughput / peer throughput (>1: clipforge faster)")
    ax.set_title("Speed relative to each peer (medians, min–max)")
    _legend_below(ax)


def _plot_memory(ax: Any, memory: list[Row]) -> None:
    """Training memory against batch size, one line per library and architecture."""
    architectures = sorted({r.case.split(" train")[0] for r in memory})
    for arch, style in zip(architectures, ("-o", "--s", ":^"), strict=False):
        points = [(int(r.case.rsplit(" ", 1)[1]), r) for r in memory if r.case.startswith(arch + " ")]
        for key in columns(memory):
            xy = [(b, r.results[key].median) for b, r in points if key in r.results]
            if xy:
                ax.plot(*zip(*xy, strict=True), style, color=COLORS[key], label=f"{LABELS[key]}, {arch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory above the pre-step baseline (MiB)")
    ax.set_title("Training-step memory")
    if memory:
        _legend_below(ax)


def _plot_peak(ax: Any, mfu_rows: list[Row], peak_rate: float | None) -> None:
    """Share of the machine's matmul peak, best precision."""
    keys = [k for k in ORDER if any(k in r.results for r in mfu_rows)]
    height = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        ys, xs = [], []
        for i, row in enumerate(mfu_rows):
            share = mfu(row, row.results[key], peak_rate) if key in row.results else None
            if share is not None:
                ys.append(i + (j - (len(keys) - 1) / 2) * height)
                xs.append(100 * share)
        ax.barh(ys, xs, height, color=COLORS[key], label=LABELS[key])
    ax.set_yticks(range(len(mfu_rows)), [r.case for r in mfu_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"% of matmul peak ({peak_rate:,.0f} GFLOP/s)" if peak_rate else "% of peak")
    ax.set_title("Model FLOP utilization (best precision)")
    _legend_below(ax)


def to_json(rows: list[Row], meta: dict) -> str:
    def encode(o: object) -> object:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)  # type: ignore[arg-type]
        return str(o)

    return json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1, default=encode)


def from_json(path: Path) -> tuple[list[Row], dict]:
    """Rows and metadata back from a report's JSON, to write the report again without measuring."""
    data = json.loads(path.read_text())
    rows = []
    for r in data["rows"]:
        results = {k: Stats(**{**v, "samples": tuple(v["samples"])}) for k, v in r["results"].items()}
        rows.append(Row(**{**r, "results": results}))
    meta = data["meta"]
    if any(row.family == "peak" for row in rows):
        meta["peak_gflops"] = peak.peak_gflops(rows)  # as this version of the suite defines it
    return rows, meta


def write(rows: list[Row], meta: dict, out: Path) -> list[Path]:
    """`out` (markdown), and beside it the plot (.png) and every repetition (.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png, raw = out.with_suffix(".png"), out.with_suffix(".json")
    raw.write_text(to_json(rows, meta) + "\n")  # first: the measurements survive whatever fails below
    findings = kept_findings(out.read_text()) if out.exists() else ""
    out.write_text(markdown(rows, meta, png.name, findings))
    try:
        plot(rows, meta, png)
    except ImportError as e:  # no matplotlib: the tables are complete without the plot
        print(f"no plot ({e}); --from-json {raw} draws it where matplotlib is installed", file=sys.stderr)
        return [raw, out]
    return [raw, out, png]
