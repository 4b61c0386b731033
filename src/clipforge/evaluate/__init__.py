"""Evaluation the paper's way: zero-shot classification with prompt ensembling (more to come)."""

from clipforge.evaluate.zeroshot import (
    ZeroShotResult,
    accuracy_report,
    build_classifier,
    zeroshot_logits,
)

__all__ = ["ZeroShotResult", "accuracy_report", "build_classifier", "zeroshot_logits"]
