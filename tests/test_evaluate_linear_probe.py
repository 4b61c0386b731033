"""The linear probe: the paper's C search, the validation split, and a probe on a separable set."""

import math

import numpy as np
import pytest
import torch

from clipforge.evaluate.linear_probe import (
    class_logits,
    fit_logistic,
    linear_probe,
    search_c,
    stratified_split,
)


def test_search_finds_the_peak_to_an_eighth_of_a_decade_in_15_fits():
    calls = []

    def score(c: float) -> float:
        calls.append(c)
        return -((math.log10(c) - 1.3) ** 2)

    best, tried = search_c(score)
    assert math.log10(best) == pytest.approx(1.25)  # the 1/8-decade point nearest 10^1.3
    assert len(calls) == len(set(calls)) == len(tried) == 15  # 7 coarse + 2 per halving, none twice
    assert min(tried) == pytest.approx(1e-6) and max(tried) == pytest.approx(1e6)


def test_search_breaks_ties_toward_stronger_regularization():
    best, _ = search_c(lambda c: 0.5)
    assert best == pytest.approx(1e-6)
    best, _ = search_c(lambda c: 1.0 if c >= 1 else 0.0)  # a plateau from C = 1 up
    assert best == pytest.approx(1.0)


def test_stratified_split_is_per_class_disjoint_and_seeded():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted([*train, *val]) == list(range(16))
    assert [int((labels[val] == c).sum()) for c in (0, 1, 2)] == [2, 1, 0]  # the singleton stays in train
    again = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])


def separable_set(sizes: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian clusters in 3 dimensions, plus 13 dimensions of pure noise."""
    g = torch.Generator().manual_seed(seed)
    centers = 5 * torch.eye(3)
    labels = torch.arange(3).repeat_interleave(torch.tensor(sizes))
    features = torch.cat([centers[labels], torch.zeros(len(labels), 13)], dim=1)
    return features + torch.randn(len(labels), 16, generator=g), labels


def test_probe_on_a_separable_set_picks_a_sensible_c_and_is_accurate():
    # Imbalanced training classes: under heavy regularization (tiny C) the unpenalized intercept wins and
    # every image gets the majority class, so the sweep must move away from C = 1e-6.
    train_x, train_y = separable_set((60, 15, 15), seed=0)
    test_x, test_y = separable_set((30, 30, 30), seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.25, seed=0)
    assert result.top1 >= 0.95 and result.top5 == 1.0
    assert result.sweep[min(result.sweep)] == pytest.approx(15 / 23)  # the majority share of validation
    assert result.C >= 1e-3 and result.val_top1 == max(result.sweep.values()) == 1.0
    assert (result.n_train, result.n_val, result.n_test) == (67, 23, 90) and result.converged


def test_classes_missing_from_training_get_minus_infinity():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    classifier = fit_logistic(x, np.array([0, 0, 2, 2]), C=1.0)
    logits = class_logits(classifier, x, num_classes=3)
    assert (
        logits.shape == (4, 3) and torch.isinf(logits[:, 1]).all() and torch.isfinite(logits[:, [0, 2]]).all()
    )
