"""The training configuration: one typed dataclass per concern, nested in `TrainConfig`.

Recipes in configs/*.toml set these fields; `clipforge train RECIPE --optim.lr 5e-4` overrides any of
them; the resolved config is written to the run directory as config.toml.

Each section checks its own values when it is made (`__post_init__`), so a bad number is refused wherever
a config comes from; `TrainConfig` checks the few rules that span sections. What needs the file system,
the model registry or the device (paths, names, `run.device`) is checked by `clipforge.train.validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from clipforge.configs import require
from clipforge.data.config import DataConfig

FINITE_POSITIVE = "must be a finite number > 0"
FINITE_NON_NEGATIVE = "must be a finite number >= 0"


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


@dataclass
class ModelSection:
    name: str = "ViT-Nano-16-64"  # a registered architecture (`clipforge models` lists them)
    pretrained: str = ""  # optional weights to start from: a file, a model directory or a release name
    tokenizer: str = ""  # "" = OpenAI's BPE; or a directory made by `clipforge tokenizer train`
    grad_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, more compute
    compile: bool = False  # torch.compile the model (helps on GPUs; measure before using on a CPU)
    # FLIP: drop this fraction of the image's patch tokens in training (ViT only; eval sees all of them).
    patch_dropout: float = 0.0
    # LiT: freeze a tower (no gradients, not in the optimizer, kept in eval mode); use with `pretrained`.
    lock_image: bool = False
    lock_text: bool = False
    # With a locked tower: keep its last N residual blocks trainable, with what follows them (the final
    # norm and the projection, or a ResNet's attention pool); 0 locks the whole tower.
    lock_image_unlocked_blocks: int = 0
    lock_text_unlocked_blocks: int = 0
    # ResNet image towers: BatchNorm layers stay in eval mode (running statistics frozen; gains and biases
    # still train unless locked).
    freeze_batchnorm: bool = False
    image_size: int = 0  # 0: the architecture's; else pretrained positional embeddings are resized to it

    def __post_init__(self) -> None:
        require(bool(self.name.strip()), "model.name", self.name, "names no architecture")
        p = self.patch_dropout
        require(0.0 <= p < 1.0, "model.patch_dropout", p, "must be in [0, 1)")
        # A locked tower runs in eval mode, where patch dropout is off: refuse what would do nothing.
        require(
            not (p > 0 and self.lock_image and self.lock_image_unlocked_blocks == 0),
            "model.patch_dropout",
            p,
            "has no effect with model.lock_image (a locked tower is in eval mode)",
        )
        for tower in ("image", "text"):
            name = f"lock_{tower}_unlocked_blocks"
            blocks = getattr(self, name)
            require(blocks >= 0, f"model.{name}", blocks, "must be >= 0 (0: the whole tower locked)")
            require(
                blocks == 0 or getattr(self, f"lock_{tower}"),
                f"model.{name}",
                blocks,
                f"has no effect without model.lock_{tower} (an unlocked tower trains all its blocks)",
            )
        require(self.image_size >= 0, "model.image_size", self.image_size, "must be >= 0 (0: the model's)")


@dataclass
class LossConfig:
    # "contrastive": CLIP's softmax over the batch (Radford et al. 2021); "sigmoid": SigLIP's per-pair
    # sigmoid with a learned logit bias (Zhai et al. 2023). The model gets `logit_bias` only for "sigmoid".
    name: Literal["contrastive", "sigmoid"] = "contrastive"
    # Logits start scaled by 1/init_temperature. None: the loss's own (contrastive 0.07, sigmoid 0.1).
    # A fresh model only: weights from `model.pretrained` keep their own temperature.
    init_temperature: float | None = None
    learn_temperature: bool = True  # false: the temperature stays at its initial value
    # After every step the scale 1/temperature is clamped to at most this (the `logit_scale` of the
    # metrics). None: the loss's own (contrastive 100, sigmoid no clamp).
    max_logit_scale: float | None = None
    init_bias: float = -10.0  # sigmoid only: the logit bias at the start (SigLIP's -10)
    # Score this many columns of the global batch at a time (contrastive: a running log-sum-exp), so no
    # (local batch x global batch) logits matrix exists; 0 = all columns at once. Same loss and gradient.
    chunk_size: int = 0

    def __post_init__(self) -> None:
        t, scale = self.init_temperature, self.max_logit_scale
        require(t is None or _finite_positive(t), "loss.init_temperature", t, FINITE_POSITIVE)
        # inf is allowed: no clamp (the sigmoid loss's own setting).
        require(
            scale is None or scale >= 1, "loss.max_logit_scale", scale, "must be at least 1 (inf: no clamp)"
        )
        require(math.isfinite(self.init_bias), "loss.init_bias", self.init_bias, "must be finite")
        require(self.chunk_size >= 0, "loss.chunk_size", self.chunk_size, "must be >= 0 (0: unchunked)")


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.2  # decoupled (AdamW), on weights only: never on gains, biases, temperature
    beta1: float | None = None  # None: the paper's value for the image tower (0.9)
    beta2: float | None = None  # None: the paper's (ViT 0.98, ResNet 0.999)
    eps: float | None = None  # None: the paper's (ViT 1e-6, ResNet 1e-8)
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 disables
    # Layer-wise lr decay, per tower: a parameter at layer i of a tower of `depth` blocks trains at
    # lr * layer_decay**(depth - i) (embeddings i = 0, blocks 1..depth; what follows the blocks: lr).
    # 1: off.
    layer_decay: float = 1.0
    # Keep a moving average of the weights with this decay per step (0: off); evaluation scores it and
    # checkpoints save it as `ema/` (train/ema.py).
    ema: float = 0.0

    def __post_init__(self) -> None:
        require(_finite_positive(self.lr), "optim.lr", self.lr, FINITE_POSITIVE)
        wd = self.weight_decay
        require(_finite_non_negative(wd), "optim.weight_decay", wd, FINITE_NON_NEGATIVE)
        for name in ("beta1", "beta2"):
            beta = getattr(self, name)
            require(beta is None or 0.0 <= beta < 1.0, f"optim.{name}", beta, "must be in [0, 1)")
        require(self.eps is None or _finite_positive(self.eps), "optim.eps", self.eps, FINITE_POSITIVE)
        clip = self.grad_clip
        require(_finite_non_negative(clip), "optim.grad_clip", clip, FINITE_NON_NEGATIVE + " (0: off)")
        decay = self.layer_decay
        require(0.0 < decay <= 1.0, "optim.layer_decay", decay, "must be in (0, 1] (1: off)")
        require(0.0 <= self.ema < 1.0, "optim.ema", self.ema, "must be in [0, 1) (0: off)")


@dataclass
class ScheduleConfig:
    steps: int = 1000  # optimizer steps in the whole run
    warmup_steps: int = 100  # linear warmup from 0 to optim.lr
    final_lr: float = 0.0  # where the cosine decay ends

    def __post_init__(self) -> None:
        require(self.steps >= 1, "schedule.steps", self.steps, "must be at least 1")
        w = self.warmup_steps
        require(w >= 0, "schedule.warmup_steps", w, "must be >= 0")
        require(
            w <= self.steps,
            "schedule.warmup_steps",
            w,
            f"more than schedule.steps = {self.steps}: the learning rate would never reach optim.lr",
        )
        f = self.final_lr
        require(_finite_non_negative(f), "schedule.final_lr", f, FINITE_NON_NEGATIVE)


@dataclass
class EvalConfig:
    every: int = 0  # zero-shot evaluation every N steps (0: only at the end); -1 disables it
    # "auto": the synthetic held-out set when training on synthetic data, else no evaluation; "synthetic"
    # (held-out combinations of the built-in set); or a labelled set: tar shards, a class-folder tree, a CSV
    data: str = "auto"
    classes: str = ""  # the class names of a labelled set: a JSON file or a built-in set (cifar10, ...)
    templates: str = ""  # a file of prompt templates with {} for the class; empty: the class name alone
    label_key: str = "label"  # the field of each sample's json holding its class name
    max_samples: int = 0  # evaluate on at most this many images (0: all)
    batch_size: int = 256

    def __post_init__(self) -> None:
        require(self.every >= -1, "eval.every", self.every, "must be >= -1 (-1: never, 0: at the end)")
        require(bool(self.data), "eval.data", self.data, "names no set (auto, synthetic or a labelled set)")
        require(bool(self.label_key), "eval.label_key", self.label_key, "must name a json field")
        require(self.max_samples >= 0, "eval.max_samples", self.max_samples, "must be >= 0 (0: all)")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be at least 1")


@dataclass
class RunConfig:
    out_dir: str = "runs/quickstart"  # checkpoints, metrics, curves and the resolved config go here
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast; weights and optimizer stay fp32
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (all cores)
    log_every: int = 10  # steps between metric lines
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # keep the newest K checkpoints; 0 keeps them all
    max_bad_steps: int = 5  # stop after this many skipped (non-finite) updates in a row
    progress: bool = True  # show a progress bar
    # Under torchrun (several processes): "ddp" keeps a whole model per process and averages gradients;
    # "fsdp" shards parameters, gradients and optimizer state over the processes (FSDP2, per residual block).
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        require(bool(self.out_dir.strip()), "run.out_dir", self.out_dir, "names no directory")
        # NumPy's seed is the narrowest of the three generators seeded with it.
        require(0 <= self.seed < 2**32, "run.seed", self.seed, "must be in [0, 2**32)")
        require(bool(self.device.strip()), "run.device", self.device, "names no device")
        require(self.threads >= 0, "run.threads", self.threads, "must be >= 0 (0: torch's default)")
        require(self.log_every >= 1, "run.log_every", self.log_every, "must be at least 1")
        every = self.checkpoint_every
        require(every >= 0, "run.checkpoint_every", every, "must be >= 0 (0: only at the end)")
        keep = self.keep_checkpoints
        require(keep >= 0, "run.keep_checkpoints", keep, "must be >= 0 (0: keep them all)")
        require(self.max_bad_steps >= 1, "run.max_bad_steps", self.max_bad_steps, "must be at least 1")
        require(self.strategy in ("ddp", "fsdp"), "run.strategy", self.strategy, "must be 'ddp' or 'fsdp'")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        f, lr = self.schedule.final_lr, self.optim.lr
        require(f <= lr, "schedule.final_lr", f, f"more than optim.lr = {lr}: the cosine would rise")
        require(
            self.optim.ema == 0 or self.run.strategy == "ddp",
            "optim.ema",
            self.optim.ema,
            "needs run.strategy = 'ddp' (a sharded run keeps no whole model to average)",
        )
