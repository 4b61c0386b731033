"""The growth law the memory sweeps use to skip points that would not fit the machine."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.points import extrapolate


def test_a_linear_series_is_carried_on_linearly():
    assert math.isclose(extrapolate([256, 512], [100.0, 200.0], 2048), 800.0)


def test_a_quadratic_series_is_carried_on_quadratically():
    assert math.isclose(extrapolate([4096, 8192, 16384], [1.0, 4.0, 16.0], 32768), 64.0)


def test_the_exponent_is_clamped_to_the_given_range():
    # Faster than quadratic (allocator noise) is capped at 2; slower than linear is raised to 1.
    assert math.isclose(extrapolate([1, 2], [1.0, 10.0], 4), 40.0)
    assert math.isclose(extrapolate([1, 2], [10.0, 10.0], 4), 20.0)


def test_a_single_point_is_carried_on_with_the_cautious_exponent():
    assert math.isclose(extrapolate([100], [3.0], 200), 12.0)


def test_mismatched_points_are_refused():
    with pytest.raises(ValueError, match="matching"):
        extrapolate([1, 2], [1.0], 4)
