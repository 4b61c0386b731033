"""A result row: one case measured for several contenders, in one unit, with its FLOPs when it has them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bench.timing import Stats


@dataclass
class Row:
    family: str  # "encode", "train", "memory", "data", "tokenizer", "peak"
    case: str  # what was measured, e.g. "ViT-B-32 image, batch 32"
    unit: str  # e.g. "images/s", "MiB"
    results: dict[str, Stats]  # contender key -> statistics over repetitions, in `unit`
    higher_is_better: bool = True
    precision: str = ""  # "fp32" or "bf16" where it applies
    flops_per_item: float | None = None  # counted FLOPs per unit item (for % of peak)
    best_of: str = ""  # rows with the same non-empty `best_of` are one case at several precisions
    note: str = ""
    extra: dict = field(default_factory=dict)  # anything else worth keeping in the JSON

    def __post_init__(self) -> None:
        # Rows are made right after their measurement: the machine's load then (1-minute average).
        self.extra.setdefault("load_average", round(os.getloadavg()[0], 2))

    def ratio(self, ours: str, peer: str) -> float | None:
        """How much better `ours` is than `peer` (> 1: better), from the medians."""
        if ours not in self.results or peer not in self.results:
            return None
        a, b = self.results[ours].median, self.results[peer].median
        if a <= 0 or b <= 0:
            return None
        return a / b if self.higher_is_better else b / a

    def brief(self) -> str:
        """One line for the console while the suite runs."""
        values = ", ".join(f"{k} {v.median:.4g}" for k, v in self.results.items())
        return f"  {self.family}: {self.case} {self.precision} [{self.unit}] {values}"

    def check_parameters(self, counts: dict[str, int]) -> None:
        """Keep each contender's parameter count; a mismatch (not the same network) goes into the note."""
        self.extra["parameters"] = counts
        if len(set(counts.values())) > 1:
            self.note = (self.note + "; " if self.note else "") + f"**parameter counts differ: {counts}**"
