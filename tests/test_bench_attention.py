"""bench.attention: both contenders time the same shapes, and the table says which one `attend` runs."""

from __future__ import annotations

import pytest
from bench import attention


def test_both_contenders_are_timed_on_a_shape() -> None:
    ms = attention.milliseconds(("tiny", 2, 2, 9, 8, True), attention.torch.bfloat16, train=True, reps=2)
    assert set(ms) == {"SDPA", "explicit"} and all(t > 0 for t in ms.values())


def test_the_table_names_the_implementation_attend_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    short, long = ("short", 2, 1, 8, 8, False), ("long", 1, 1, 101, 8, False)
    monkeypatch.setattr(attention, "SHAPES", [short, long])
    rows = [r for r in attention.table(reps=1).splitlines() if r.startswith(("| short", "| long"))]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    picks = [(c[0], c[2], c[-1]) for c in cells]
    assert ("short", "bfloat16", "explicit") in picks and ("short", "float32", "SDPA") in picks
    assert ("long", "bfloat16", "SDPA") in picks
