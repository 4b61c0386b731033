"""The tiny CLIPs, batches and hand-written training loop the FSDP2 tests share: every run of a case sees
the same global batches, so 1 process, 2 replicas and 2 shards can be compared step by step."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from clipforge.models import CLIP, get_config
from clipforge.train.loss import clamp_logit_scale, sharded_contrastive_loss, sharded_sigmoid_loss
from clipforge.train.optim import make_optimizer
from clipforge.train.steps import parameters_finite

WORLD, BATCH, CONTEXT, VOCAB = 2, 8, 16, 600
STEPS, LR, EPS, WEIGHT_DECAY, MAX_NORM = 3, 1e-3, 1e-3, 0.2, 1.0


@dataclass(frozen=True)
class Case:
    model: str
    loss: str  # "contrastive" or "sigmoid"
    max_log_scale: float = math.inf  # the temperature clamp; below the initial log(1/0.07) it binds
    checkpointing: bool = False  # gradient checkpointing: blocks recomputed in the backward
    whole_batch: bool = True  # also compare with 1 process on the whole batch (not with BatchNorm)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.loss}" + ("-checkpointed" if self.checkpointing else "")

    def config(self):
        config = get_config(self.model)
        text = dataclasses.replace(config.text, vocab_size=VOCAB)
        return dataclasses.replace(config, text=text, logit_bias=self.loss == "sigmoid")


CASES = [
    Case("ViT-Micro-16-32", "contrastive", max_log_scale=2.6),
    Case("ViT-Micro-16-32", "sigmoid"),
    Case("ViT-Micro-16-32", "contrastive", checkpointing=True),
    # BatchNorm normalizes each process's rows on their own, as under DDP: no whole-batch twin.
    Case("RN-Tiny-64", "contrastive", whole_batch=False),
]
RESUME = CASES[0]


def build(case: Case, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(case.config())
    model.set_grad_checkpointing(case.checkpointing)
    return model


def optimizer_for(model: CLIP) -> torch.optim.Optimizer:
    return make_optimizer(model, LR, WEIGHT_DECAY, (0.9, 0.98), EPS)  # the trainer's fused AdamW


def batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    size = case.config().vision.image_size
    images = torch.randn(BATCH, 3, size, size, generator=g)
    tokens = torch.randint(1, VOCAB - 1, (BATCH, CONTEXT), generator=g)
    tokens[:, -1] = VOCAB - 1  # the end token, where the text tower reads its features
    return images, tokens


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (collective for a DTensor)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model, optimizer, case: Case, steps: range, rank: int, world: int, replicated: bool) -> list[dict]:
    """`steps` optimizer steps on this process's rows of each global batch: encode, normalize, sharded
    loss, backward, (replicas: average gradients, what DDP does), clip, step, clamp the temperature.
    Returns per step the gradient norm and the clipped gradients the optimizer applied."""
    records = []
    for step in steps:
        images, tokens = batch(case, step)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        image = F.normalize(model.encode_image(images[rows]), dim=-1)
        text = F.normalize(model.encode_text(tokens[rows]), dim=-1)
        if case.loss == "sigmoid":
            loss = sharded_sigmoid_loss(image, text, model.logit_scale, model.logit_bias, rank, world)
        else:
            loss = sharded_contrastive_loss(image, text, model.logit_scale, rank, world)
        loss.backward()
        if replicated and world > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad /= world
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item()
        grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert parameters_finite(optimizer)
        clamp_logit_scale(model.logit_scale, case.max_log_scale)
        records.append({"grad_norm": norm, "grads": grads})
    return records


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters()}


def moments(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state by parameter name: step count, first and second moments (whole tensors)."""
    names = {p: n for n, p in model.named_parameters()}
    return {f"{names[p]}.{k}": full(v) for p, state in optimizer.state.items() for k, v in state.items()}
