"""Evaluation tasks on a loaded model: zero-shot classification, linear probe, retrieval.

`Evaluator` holds a model with its tokenizer and the run settings (batch size, decode workers, device,
progress bars, feature cache). `TaskConfig` describes one task the way a suite file or the command line
does, and `run_task` reads its data, computes (or fetches) the features and returns the metrics.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from clipforge.evaluate.cache import FeatureCache, images_fingerprint, model_fingerprint
from clipforge.evaluate.datasets import (
    DataSpec,
    EvalData,
    drop_undecodable,
    read_captioned,
    read_labelled,
)
from clipforge.evaluate.features import encode_texts, image_features
from clipforge.evaluate.linear_probe import LinearProbeResult, linear_probe
from clipforge.evaluate.prompts import Prompts, load_prompts, load_templates
from clipforge.evaluate.retrieval import RetrievalResult, evaluate_retrieval
from clipforge.evaluate.zeroshot import (
    ZeroShotResult,
    accuracy_report,
    build_classifier_for_names,
    zeroshot_logits,
)
from clipforge.transforms import EvalTransform
from clipforge.transforms.loading import DEFAULT_MAX_IMAGE_PIXELS

TaskKind = Literal["zeroshot", "linear-probe", "retrieval"]


@dataclass
class Evaluator:
    """A model ready to evaluate. `tokenizer(texts, context_length=..., truncate=True)` gives token ids;
    `model_id` (a content hash of the weights) keys the feature cache, which is off when either is unset."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    model_id: str = ""
    batch_size: int = 256
    workers: int = 2
    device: str = "cpu"
    progress: bool = False
    cache: FeatureCache | None = None
    max_image_pixels: int | None = None  # larger images are left out undecoded (None: the default limit)

    @classmethod
    def load(cls, name_or_path: str, int8: bool = False, **settings: Any) -> Evaluator:
        """Whatever `clipforge.load` takes: a release name, a clipforge or checkpoint directory, a file.

        The model is evaluated through its inference copy (`clipforge.for_inference`: BatchNorms folded,
        channels-last ResNet; the same function up to float rounding). `int8`: the opt-in int8 copy
        (`clipforge.models.int8`) instead, to see what it costs.
        """
        from clipforge.checkpoints import load
        from clipforge.models import for_inference, quantize_int8

        model, _, tokenizer = load(name_or_path, device=settings.get("device", "cpu"))
        model_id = model_fingerprint(name_or_path)
        if int8:
            model, model_id = quantize_int8(model), f"{model_id}-int8"  # int8 features are cached apart
        else:
            model = for_inference(model)
        return cls(model, tokenizer, model_id=model_id, **settings)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.model.context_length, truncate=True)

    def _cached(self, description: dict[str, Any], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.cache is None or not self.model_id:
            return compute()
        return self.cache.get_or_compute({"model": self.model_id, **description}, compute)

    def image_features(self, data: EvalData, layer: str = "embed") -> torch.Tensor:
        """(N, D) features of the set's usable images, from the cache when it has them.

        Images that cannot be used are removed from `data` (counted in its `skipped_by_reason`), so the
        rows stay aligned with `data`: read its labels or captions after this call."""
        transform = EvalTransform(self.model.config.vision.image_size)
        limit = DEFAULT_MAX_IMAGE_PIXELS if self.max_image_pixels is None else self.max_image_pixels
        description = {"kind": "image", "layer": layer, "transform": repr(transform), "max_pixels": limit}
        description["images"] = images_fingerprint(data.images)
        settings = {"batch_size": self.batch_size, "workers": self.workers, "device": self.device}
        features = self._cached(
            description,
            lambda: image_features(
                self.model, data.images, layer=layer, progress=self.progress, max_pixels=limit, **settings
            ),
        )
        return drop_undecodable(data, features, transform, limit)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(M, D) L2-normalized text features, from the cache when it has them."""
        description = {
            "kind": "text",
            "texts": hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest(),
            "tokenizer": str(getattr(self.tokenizer, "identity", self.tokenizer)),
            "context_length": self.model.context_length,
        }
        settings = {"batch_size": self.batch_size, "device": self.device, "progress": self.progress}
        return self._cached(description, lambda: encode_texts(self.model, self.tokenize, texts, **settings))

    def zeroshot(
        self, data: EvalData, prompts: Prompts, templates: Sequence[str] = (), confusion: bool = False
    ) -> ZeroShotResult:
        """Prompt-ensembled zero-shot classification of `data`, labelled with `prompts`' classes."""
        templates = tuple(templates) or prompts.templates or ("{}",)
        classifier = build_classifier_for_names(
            self.model, self.tokenize, prompts.classes, templates, self.batch_size, self.device
        )
        features = self.image_features(data)  # leaves out the images that cannot be used, from data too
        logits = zeroshot_logits(features.to(self.device), classifier).cpu()
        return accuracy_report(logits, torch.tensor(data.labels), confusion=confusion)

    def linear_probe(
        self,
        train: EvalData,
        test: EvalData,
        layer: str = "pre-projection",
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> LinearProbeResult:
        """The paper's linear probe on `layer` features; test labels must use train's class indices."""
        num_classes = len(train.classnames or []) or None
        train_features, test_features = self.image_features(train, layer), self.image_features(test, layer)
        return linear_probe(
            train_features,
            torch.tensor(train.labels),
            test_features,
            torch.tensor(test.labels),
            num_classes=num_classes,
            val_fraction=val_fraction,
            seed=seed,
        )

    def retrieval(self, data: EvalData) -> RetrievalResult:
        """Image <-> text retrieval over the set's images and all their captions."""
        images = self.image_features(data).to(self.device)  # first: it leaves out unusable images
        captions = data.captions or []
        texts = [caption for image_captions in captions for caption in image_captions]
        owner = torch.tensor([i for i, image_captions in enumerate(captions) for _ in image_captions])
        return evaluate_retrieval(images, self.text_features(texts).to(self.device), owner.to(self.device))


@dataclass
class TaskConfig:
    """One evaluation, as a suite file's [[task]] table or a command line describes it."""

    kind: TaskKind
    name: str = ""  # default: kind and data file name
    data: str = ""  # the evaluation set (linear-probe: the test set)
    train: str = ""  # linear-probe: the training set
    format: Literal["auto", "webdataset", "folder", "csv"] = "auto"
    classes: str = ""  # zeroshot: class file or built-in prompt set; linear-probe: optional class file
    templates: str = ""  # zeroshot: template file, built-in set or literal ("" = the classes' own or "{}")
    label_key: str = "label"
    caption_key: str = "txt"
    image_key: str = "filepath"
    max_samples: int = 0
    layer: str = ""  # "" = "embed" (zeroshot, retrieval) or "pre-projection" (linear-probe)
    val_fraction: float = 0.2
    seed: int = 0

    def spec(self, path: str) -> DataSpec:
        return DataSpec(
            path, self.format, self.label_key, self.caption_key, self.image_key, max_samples=self.max_samples
        )

    @property
    def title(self) -> str:
        return self.name or f"{self.kind} {Path(self.data.rstrip('/')).name}"


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]  # the headline numbers (tables and charts)
    details: dict[str, Any] = field(default_factory=dict)  # everything else worth keeping (JSON)
    result: Any = None  # the full result object (ZeroShotResult, LinearProbeResult, RetrievalResult)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "metrics": self.metrics, **self.details}


def run_task(evaluator: Evaluator, task: TaskConfig, confusion: bool = False) -> TaskResult:
    """Read the task's data, evaluate, and return its metrics."""
    details: dict[str, Any] = {"task": asdict(task)}
    if task.kind == "zeroshot":
        prompts = load_prompts(task.classes)
        templates = load_templates(task.templates) if task.templates else []
        data = read_labelled(task.spec(task.data), prompts.classnames)
        result: Any = evaluator.zeroshot(data, prompts, templates, confusion=confusion)
        metrics = {"top1": result.top1, "top5": result.top5, "mean_per_class": result.mean_per_class}
        details["per_class"] = _per_class_by_name(result.per_class, prompts.classnames)
        details["templates"] = list(templates or prompts.templates or ("{}",))
    elif task.kind == "linear-probe":
        classnames = load_prompts(task.classes).classnames if task.classes else None
        train = read_labelled(task.spec(task.train), classnames)
        data = read_labelled(task.spec(task.data), train.classnames)
        layer = task.layer or "pre-projection"
        result = evaluator.linear_probe(train, data, layer, task.val_fraction, task.seed)
        metrics = {"top1": result.top1, "top5": result.top5, "mean_per_class": result.mean_per_class}
        metrics["C"] = result.C
        details.update(result.as_dict(), train_skipped_by_reason=train.skipped_by_reason)
    elif task.kind == "retrieval":
        data = read_captioned(task.spec(task.data))
        result = evaluator.retrieval(data)
        metrics = {k: v for k, v in result.as_dict().items() if not k.startswith("n_")}
        details.update(n_images=result.n_images, n_texts=result.n_texts)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    details.update(n=len(data), skipped=data.skipped, skipped_by_reason=data.skipped_by_reason)
    return TaskResult(task.title, task.kind, metrics, details, result)


def _per_class_by_name(per_class: dict[int, float], names: list[str]) -> dict[str, float]:
    """Per-class accuracy keyed by class name ("name (index)" for a name that several classes share)."""
    shared = {name for name, count in Counter(names).items() if count > 1}
    return {names[c] + (f" ({c})" if names[c] in shared else ""): acc for c, acc in sorted(per_class.items())}
