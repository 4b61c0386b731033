"""The training configuration: one typed dataclass per concern, nested in `TrainConfig`.

Recipes in configs/*.toml set these fields; `clipforge train RECIPE --optim.lr 5e-4` overrides any of
them; the resolved config is written to the run directory as config.toml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clipforge.data.config import DataConfig


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

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.patch_dropout > 0 and self.lock_image:
            # A locked tower runs in eval mode, where patch dropout is off: refuse what would do nothing.
            raise ValueError(
                "model.patch_dropout has no effect with model.lock_image (a locked tower is in eval mode)"
            )


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

    def __post_init__(self) -> None:
        if self.init_temperature is not None and not self.init_temperature > 0:
            raise ValueError(f"loss.init_temperature must be positive, got {self.init_temperature}")
        if self.max_logit_scale is not None and not self.max_logit_scale >= 1:
            raise ValueError(f"loss.max_logit_scale must be at least 1, got {self.max_logit_scale}")


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.2  # decoupled (AdamW), on weights only: never on gains, biases, temperature
    beta1: float | None = None  # None: the paper's value for the image tower (0.9)
    beta2: float | None = None  # None: the paper's (ViT 0.98, ResNet 0.999)
    eps: float | None = None  # None: the paper's (ViT 1e-6, ResNet 1e-8)
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 disables


@dataclass
class ScheduleConfig:
    steps: int = 1000  # optimizer steps in the whole run
    warmup_steps: int = 100  # linear warmup from 0 to optim.lr
    final_lr: float = 0.0  # where the cosine decay ends


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


@dataclass
class RunConfig:
    out_dir: str = "runs/quickstart"  # checkpoints, metrics, curves and the resolved config go here
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; weights and optimizer stay fp32)
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (all cores)
    log_every: int = 10  # steps between metric lines
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # keep the newest K checkpoints
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    progress: bool = True  # show a progress bar


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
