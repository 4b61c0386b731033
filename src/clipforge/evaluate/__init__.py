"""Evaluation the paper's way: zero-shot classification with prompt ensembling (§3.1.4), linear probes
(appendix A.3), image-text retrieval, and suites of them with cached features. See docs/evaluation.md.

    from clipforge.evaluate import Evaluator, TaskConfig, run_task
    evaluator = Evaluator.load("runs/pictext-tiny/step-00000400")
    result = run_task(evaluator, TaskConfig("zeroshot", data="eval.tar", classes="classes.json"))
"""

from clipforge.evaluate.cache import FeatureCache, model_fingerprint
from clipforge.evaluate.datasets import DataSpec, EvalData, ImageRef, read_captioned, read_labelled
from clipforge.evaluate.features import encode_texts, image_features
from clipforge.evaluate.linear_probe import LinearProbeResult, linear_probe, search_c
from clipforge.evaluate.prompts import Prompts, available_prompts, load_prompts, load_templates
from clipforge.evaluate.retrieval import RetrievalResult, evaluate_retrieval, retrieval_ranks
from clipforge.evaluate.suite import SuiteConfig, load_suite, run_suite
from clipforge.evaluate.tasks import Evaluator, TaskConfig, TaskResult, run_task
from clipforge.evaluate.zeroshot import (
    ZeroShotResult,
    accuracy_report,
    build_classifier,
    build_classifier_for_names,
    zeroshot_logits,
)

__all__ = [
    "DataSpec",
    "EvalData",
    "Evaluator",
    "FeatureCache",
    "ImageRef",
    "LinearProbeResult",
    "Prompts",
    "RetrievalResult",
    "SuiteConfig",
    "TaskConfig",
    "TaskResult",
    "ZeroShotResult",
    "accuracy_report",
    "available_prompts",
    "build_classifier",
    "build_classifier_for_names",
    "encode_texts",
    "evaluate_retrieval",
    "image_features",
    "linear_probe",
    "load_prompts",
    "load_suite",
    "load_templates",
    "model_fingerprint",
    "read_captioned",
    "read_labelled",
    "retrieval_ranks",
    "run_suite",
    "run_task",
    "search_c",
    "zeroshot_logits",
]
