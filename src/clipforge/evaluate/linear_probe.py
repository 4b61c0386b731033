"""Linear probe (Radford et al. 2021, appendix A.3): logistic regression on frozen image features.

The protocol, as the paper describes it:
1. A validation split is carved from the training set (stratified, seeded; `val_fraction` per class).
2. scikit-learn's L-BFGS logistic regression (max_iter 1000) is fitted on the rest for each candidate
   regularization, and scored by top-1 accuracy on the validation split. scikit-learn's C is the inverse
   of the L2 strength lambda; both sweep 1e-6 .. 1e6.
3. The sweep is the paper's "parametric binary search": C in {1e-6, 1e-4, ..., 1e6} first, then,
   around the best, the points half a step to either side, halving the step until it is 1/8 decade
   (8 steps per decade, the resolution of the paper's 96-step grid). 15 fits in all. A tie in validation
   accuracy goes to the smaller C (the stronger regularization).
4. The chosen C is refitted on train + validation, and the test set is scored.

Features are used as they come (no normalization or standardization), as in OpenAI's linear-probe example.
scikit-learn is imported only here, and only when a probe runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipforge.evaluate.zeroshot import accuracy_report

MAX_ITER = 1000


@dataclass
class LinearProbeResult:
    top1: float
    top5: float
    mean_per_class: float
    C: float  # the chosen inverse L2 strength (scikit-learn's C = 1 / lambda)
    val_top1: float  # validation accuracy at that C
    sweep: dict[float, float]  # every C tried -> validation accuracy
    n_train: int
    n_val: int
    n_test: int
    converged: bool  # the final fit stopped before max_iter

    def as_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "mean_per_class": self.mean_per_class,
            "C": self.C,
            "val_top1": self.val_top1,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_test": self.n_test,
            "converged": self.converged,
            "sweep": {f"{c:.6g}": acc for c, acc in sorted(self.sweep.items())},
        }


def search_c(
    score: Callable[[float], float],
    low: float = -6.0,
    high: float = 6.0,
    coarse_step: float = 2.0,
    final_step: float = 0.125,
) -> tuple[float, dict[float, float]]:
    """(C maximizing `score(C)`, {C: score} of every C tried): the coarse grid over 10^low..10^high,
    then halving the step around the best. Exponents are kept exact multiples of `final_step`."""
    tried: dict[float, float] = {}  # log10 C -> score

    def at(exponent: float) -> float:
        if exponent not in tried:
            tried[exponent] = score(10.0**exponent)
        return tried[exponent]

    def best_of(exponents: list[float]) -> float:
        return max(exponents, key=lambda e: (at(e), -e))  # ties: smaller C

    steps = round((high - low) / coarse_step)
    best = best_of([low + i * coarse_step for i in range(steps + 1)])
    step = coarse_step
    while step > final_step:
        step /= 2
        best = best_of([e for e in (best - step, best, best + step) if low <= e <= high])
    return 10.0**best, {10.0**e: s for e, s in tried.items()}


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): per class, round(val_fraction x count) go to validation,
    at least one when the class has two or more samples and always leaving one for training."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float, seed: int = 0) -> Any:
    """scikit-learn's L-BFGS multinomial logistic regression, max_iter 1000, fitted to (x, y)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=C, max_iter=MAX_ITER, solver="lbfgs", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported through `converged` instead
        return classifier.fit(x, y)


def class_logits(classifier: Any, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, num_classes) log-probabilities; classes the classifier never saw get -inf."""
    logits = torch.full((len(x), num_classes), -math.inf, dtype=torch.float64)
    logits[:, torch.from_numpy(classifier.classes_)] = torch.from_numpy(classifier.predict_log_proba(x))
    return logits


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> LinearProbeResult:
    """The paper's linear probe: C chosen on a validation split of train, refitted, scored on test."""
    x = train_features.double().numpy()
    y = train_labels.long().numpy()
    x_test, y_test = test_features.double().numpy(), test_labels.long()
    num_classes = num_classes or int(max(y.max(), y_test.max())) + 1
    fit_idx, val_idx = stratified_split(y, val_fraction, seed)

    def val_accuracy(C: float) -> float:
        classifier = fit_logistic(x[fit_idx], y[fit_idx], C, seed)
        return float((classifier.predict(x[val_idx]) == y[val_idx]).mean())

    best_c, sweep = search_c(val_accuracy)
    final = fit_logistic(x, y, best_c, seed)
    report = accuracy_report(class_logits(final, x_test, num_classes), y_test)
    return LinearProbeResult(
        top1=report.top1,
        top5=report.top5,
        mean_per_class=report.mean_per_class,
        C=best_c,
        val_top1=sweep[best_c],
        sweep=sweep,
        n_train=len(fit_idx),
        n_val=len(val_idx),
        n_test=len(y_test),
        converged=bool(np.all(final.n_iter_ < MAX_ITER)),
    )
