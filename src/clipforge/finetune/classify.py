"""Classification fine-tuning of CLIP's image tower from its zero-shot head (`clipforge finetune`).

The classic robust fine-tuning baseline (Wortsman et al. 2022; Kumar et al. 2022): a linear head on the
image features starts as the zero-shot classifier (`finetune.head`), then the image tower -- and, with
`head = "trainable"`, the head -- train with cross-entropy on a labelled set. The text tower never trains:
it is in no optimizer group and comes out bit-identical.

The run is AdamW (`train.optim.make_optimizer`: no decay on gains and biases) with linear warmup and cosine
decay (`WarmupCosine`), the trainer's random resized crop (`TrainTransform`) keyed by the sample's position
in the run, so the crops do not depend on the worker count, and a seeded shuffle per epoch. An image that
cannot be used is left out of its batch and counted by reason, once per image.

Everything is checked (`prepare`) before anything is written. The output directory then holds:
- model/: a clipforge model directory with its tokenizer (written atomically);
- head.safetensors and classes.json: the trained head (`head = "trainable"` only; see `head.load_head`);
- config.toml: the resolved config; metrics.jsonl: a line every `log_every` steps, then the summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.atomic import write_file
from clipforge.checkpoints.native import is_native_dir, save_native
from clipforge.configs import ConfigError, dump_toml
from clipforge.evaluate.datasets import DataSpec, EvalData, read_labelled
from clipforge.evaluate.images import ImageDataset, ImageRef
from clipforge.evaluate.prompts import Prompts, load_prompts, load_templates
from clipforge.evaluate.tasks import Evaluator
from clipforge.finetune.config import FinetuneConfig
from clipforge.finetune.head import (
    CLASSES_FILE,
    HEAD_FILE,
    ImageClassifier,
    head_accuracy,
    save_head,
    zeroshot_head,
)
from clipforge.train.optim import PAPER_ADAM, WarmupCosine, make_optimizer, set_lr
from clipforge.train.steps import autocast_for
from clipforge.transforms import TrainTransform
from clipforge.transforms.loading import DEFAULT_MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

MODEL_DIR = "model"
RESULT_FILES = ("config.toml", "metrics.jsonl", HEAD_FILE, CLASSES_FILE)


@dataclass
class Prepared:
    """What a run needs, read and checked: nothing has been written yet."""

    model: torch.nn.Module
    tokenizer: Any
    prompts: Prompts
    templates: tuple[str, ...]
    train: EvalData
    held_out: EvalData | None
    device: torch.device


@dataclass
class FinetuneResult:
    steps: int
    loss: float  # the last step's
    train_accuracy: float  # of the last `log_every` steps' batches (augmented, in training mode)
    held_out: dict[str, float] | None  # top1, top5, mean_per_class, n of the held-out set, if any
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # training images left out
    out_dir: Path = Path()

    @property
    def model_dir(self) -> Path:
        return self.out_dir / MODEL_DIR


# ------------------------------------------------------------------------------------------------------
# Checking
# ------------------------------------------------------------------------------------------------------


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Load the model and read the sets, or raise `ConfigError` naming the field: nothing is written."""
    from clipforge.checkpoints import load

    cfg.check_complete()
    device = _device(cfg.device)
    check_out_dir(Path(cfg.out_dir))
    prompts = _field("data.classes", cfg.data.classes, lambda: load_prompts(cfg.data.classes))
    templates = _field("data.templates", cfg.data.templates, lambda: _templates(cfg.data.templates, prompts))
    train = _field(
        "data.train", cfg.data.train, lambda: read_labelled(_spec(cfg, cfg.data.train), _names(prompts))
    )
    held_out = None
    if cfg.data.eval:
        held_out = _field(
            "data.eval", cfg.data.eval, lambda: read_labelled(_spec(cfg, cfg.data.eval), _names(prompts))
        )
    model, _, tokenizer = _field("model", cfg.model, lambda: load(cfg.model, device=device))
    return Prepared(model, tokenizer, prompts, templates, train, held_out, device)


def check_out_dir(out: Path) -> None:
    """The output directory may be new, empty, or an earlier `clipforge finetune` output (replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"out_dir = {str(out)!r}: exists and is not a directory")
    ours = {MODEL_DIR, *RESULT_FILES}
    others = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if others or ((out / MODEL_DIR).exists() and not is_native_dir(out / MODEL_DIR)):
        raise ConfigError(
            f"out_dir = {str(out)!r}: holds files that are not a finetune output ({others[:3]})"
        )


def _field(name: str, value: str, read):
    """`read()`, with any error it raises turned into a one-line `ConfigError` naming the field."""
    try:
        return read()
    except ConfigError:
        raise
    except Exception as e:  # the readers raise many kinds (OSError, ValueError, CheckpointError, ...)
        raise ConfigError(f"{name} = {value!r}: {e}") from None


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device = {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}: CUDA is not available here")
    return device


def _templates(name: str, prompts: Prompts) -> tuple[str, ...]:
    return tuple(load_templates(name) if name else prompts.templates or ("{}",))


def _names(prompts: Prompts) -> list[str]:
    return prompts.classnames


def _spec(cfg: FinetuneConfig, path: str) -> DataSpec:
    d = cfg.data
    return DataSpec(path, d.format, d.label_key, image_key=d.image_key, max_samples=d.max_samples)


# ------------------------------------------------------------------------------------------------------
# Training data: a seeded stream of augmented images
# ------------------------------------------------------------------------------------------------------


class AugmentedStream(ImageDataset):
    """Item p is image `order[p]`, randomly cropped with key p: the crop depends on (seed, p) alone."""

    def __init__(self, images: Sequence[ImageRef], order: list[int], transform: TrainTransform):
        super().__init__(images, transform, DEFAULT_MAX_IMAGE_PIXELS)  # type: ignore[arg-type]
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def decode(self, index: int) -> torch.Tensor:
        image = self.transform.load(self.images[self.order[index]].read(), self.max_pixels)
        return self.transform(image, key=index)  # type: ignore[call-arg]


def sample_order(n: int, count: int, seed: int) -> list[int]:
    """`count` indices into n samples: one seeded permutation per epoch, concatenated."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(count / n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])[:count].tolist()


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as `cfg` says and write the output directory (see the module docstring)."""
    prep = prepare(cfg)
    torch.manual_seed(cfg.seed)
    head = zeroshot_head(prep.model, prep.tokenizer, prep.prompts, prep.templates, device=prep.device)
    classifier = ImageClassifier(prep.model, head, train_head=cfg.head == "trainable").to(prep.device)
    metrics, skipped = train_classifier(classifier, prep.train, cfg, prep.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classifier.eval()
    save_native(prep.model, out / MODEL_DIR, prep.tokenizer)
    if cfg.head == "trainable":
        save_head(head, prep.prompts.classnames, out)
    else:  # an earlier trainable run's head would otherwise sit beside a model it does not belong to
        for name in (HEAD_FILE, CLASSES_FILE):
            (out / name).unlink(missing_ok=True)
    held_out = evaluate_held_out(classifier, prep, cfg) if prep.held_out is not None else None
    last = metrics[-1]
    result = FinetuneResult(cfg.steps, last["loss"], last["accuracy"], held_out, skipped, out)
    summary = {"step": cfg.steps, "held_out": held_out, "skipped_by_reason": skipped}
    write_file(out / "config.toml", lambda tmp: tmp.write_text(dump_toml(cfg)))
    lines = "".join(json.dumps(line) + "\n" for line in [*metrics, summary])
    write_file(out / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
    return result


def train_classifier(
    classifier: ImageClassifier, data: EvalData, cfg: FinetuneConfig, device: torch.device
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """`cfg.steps` cross-entropy steps; returns the metric lines and the training images left out."""
    order = sample_order(len(data), cfg.steps * cfg.batch_size, cfg.seed)
    labels = torch.tensor(data.labels)[order]
    stream = AugmentedStream(
        data.images, order, TrainTransform(classifier.model.config.vision.image_size, seed=cfg.seed)
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.data.workers)
    optimizer = build_optimizer(classifier, cfg)
    schedule = WarmupCosine(cfg.lr, cfg.warmup_steps, cfg.steps)
    bad: dict[int, str] = {}  # image index -> why it was left out
    metrics, window, start = [], Counter(), time.perf_counter()
    classifier.train()
    for step, (images, ok) in enumerate(loader):
        batch_labels = labels[step * cfg.batch_size : step * cfg.batch_size + len(images)]
        _note_bad(stream, step * cfg.batch_size, ok, bad)
        set_lr(optimizer, schedule(step))
        if ok.any():
            loss, correct = _step(
                classifier, optimizer, images[ok].to(device), batch_labels[ok].to(device), cfg
            )
            window.update(loss=loss * int(ok.sum()), correct=correct, seen=int(ok.sum()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            metrics.append(_metric_line(step + 1, schedule(step), window, start))
            window = Counter()
    return metrics, dict(Counter(bad.values()))


def build_optimizer(classifier: ImageClassifier, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over what trains (the image tower, and the head when trainable), the paper's Adam settings
    for the tower's kind; the text tower and the temperature are in no group."""
    beta1, beta2, eps = PAPER_ADAM[classifier.model.config.vision.kind]
    return make_optimizer(classifier, cfg.lr, cfg.weight_decay, (beta1, beta2), eps)


def _step(
    classifier: ImageClassifier,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: FinetuneConfig,
) -> tuple[float, int]:
    with autocast_for(cfg.precision, images.device):
        logits = classifier(images)
    loss = F.cross_entropy(logits.float(), labels)  # in fp32 whatever the autocast: the softmax is sensitive
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((logits.argmax(dim=1) == labels).sum())


def _note_bad(stream: AugmentedStream, first: int, ok: torch.Tensor, bad: dict[int, str]) -> None:
    """Record why each unusable image of the batch was left out (decoded again, once per image)."""
    for offset in (~ok).nonzero().flatten().tolist():
        image = stream.order[first + offset]
        if image not in bad:
            skip = stream.problem(first + offset)
            bad[image] = skip.reason if skip is not None else "corrupt_image"
            log.warning("training image %s left out: %s", stream.images[image], skip)


def _metric_line(step: int, lr: float, window: Counter, start: float) -> dict[str, Any]:
    seen = window["seen"]
    return {
        "step": step,
        "lr": lr,
        "loss": window["loss"] / seen if seen else math.nan,
        "accuracy": window["correct"] / seen if seen else math.nan,
        "images": seen,
        "seconds": round(time.perf_counter() - start, 3),
    }


def evaluate_held_out(classifier: ImageClassifier, prep: Prepared, cfg: FinetuneConfig) -> dict[str, float]:
    """The held-out set's accuracy, computed the way `clipforge eval zeroshot` computes it on the saved
    model (its inference copy, the eval transform); with a trained head, that head's columns instead of
    the text tower's classifier."""
    from clipforge.models import for_inference

    evaluator = Evaluator(
        for_inference(prep.model),
        prep.tokenizer,
        batch_size=cfg.batch_size,
        workers=cfg.data.workers,
        device=str(prep.device),
    )
    assert prep.held_out is not None
    if cfg.head == "trainable":
        result = head_accuracy(evaluator, classifier.head, prep.held_out)
    else:
        result = evaluator.zeroshot(prep.held_out, prep.prompts, prep.templates)
    return result.as_dict()
