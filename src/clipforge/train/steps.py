"""Step strategies: one optimizer step from one batch, as a function the Trainer picks once.

`train_step` encodes the whole batch with autograd and backpropagates the loss through it. Its activation
memory grows with the batch, and CLIP wants huge batches (every other pair is a negative).

`gradient_cache_step` (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") takes the same step in pieces. The loss depends on the encoders only through the features, so:
1. encode the batch a micro-batch at a time without autograd and keep only the (small) features;
2. compute the full-batch loss on those features as leaves, and backpropagate it as far as the features
   (the logit scale and bias get their gradients here);
3. encode each micro-batch again, now with autograd, and backpropagate the cached feature gradient through
   it; the parameter gradients add up over micro-batches to the full-batch gradient;
4. step the optimizer once, with the same checks as `train_step`; with several processes the gradient is
   all-reduced once, after the last micro-batch (the others run with gradient sync off).
Peak activation memory is that of one micro-batch, at the price of encoding everything twice. The gradient
is the full-batch one up to floating-point summation order, provided both encodings of a micro-batch are
the same function: the torch RNG is rewound for the second (patch dropout draws from it), and a BatchNorm in
training mode, which would normalize by micro-batch statistics, is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.distributed.world import all_processes, process_count, row_counts, sum_over_processes
from clipforge.models import CLIP
from clipforge.train.loss import MAX_LOGIT_SCALE, BatchLoss, clamp_logit_scale
from clipforge.train.optim import set_lr

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class StepResult:
    loss: float  # the global batch's loss (the mean of the processes' shares)
    grad_norm: float
    # What went non-finite ("loss", "gradient norm" or "parameters"); "" for a good step.
    non_finite: str = ""

    @property
    def finite(self) -> bool:
        return not self.non_finite


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"run.precision must be 'fp32' or 'bf16', got {precision!r}")


def encode(
    model: CLIP, images: torch.Tensor, tokens: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized image and text features, encoded under `precision`'s autocast."""
    with autocast_for(precision, images.device):
        image_features = model.encode_image(images)
        text_features = model.encode_text(tokens)
    # The loss in fp32 (or wider) whatever the autocast precision: it is cheap and the softmax is sensitive.
    wide = torch.promote_types(image_features.dtype, torch.float32)
    return F.normalize(image_features.to(wide), dim=-1), F.normalize(text_features.to(wide), dim=-1)


class TrainingForward(nn.Module):
    """Both towers and the temperature as one module call.

    DDP and FSDP2 do their work around a module's forward (DDP readies its gradient all-reduce, FSDP2
    gathers the sharded weights), so everything a step differentiates comes out of this call: the
    normalized features and the logit scale and bias themselves, which the loss then uses.
    """

    def __init__(self, model: CLIP, precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.precision = precision

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> Features:
        image_features, text_features = encode(self.model, images, tokens, self.precision)
        return image_features, text_features, self.model.logit_scale, self.model.logit_bias


@dataclass
class StepParts:
    """What every step strategy works with, assembled once per run."""

    model: CLIP  # the model itself: its parameters are clipped, checked and clamped here
    optimizer: torch.optim.Optimizer
    forward: nn.Module  # a TrainingForward of `model`; DDP- or FSDP2-wrapped when there are several processes
    loss: BatchLoss = field(default_factory=BatchLoss)
    grad_clip: float = 0.0  # clip the global gradient norm to this; 0 = never
    max_log_scale: float = MAX_LOGIT_SCALE  # bound for `model.logit_scale` after the step (a log)
    # Turns the gradient all-reduce off for the backward passes before a step's last one.
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @classmethod
    def single(
        cls, model: CLIP, optimizer: torch.optim.Optimizer, precision: str = "fp32", **kwargs
    ) -> StepParts:
        """The parts of a one-process run (tests and benchmarks build them this way)."""
        return cls(model, optimizer, TrainingForward(model, precision), **kwargs)


def parameters_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter the optimizer updates is finite, on every process alike.

    The 2-norm of each tensor (one fused kernel on CUDA, vectorized sums on a CPU, one sync) is NaN or inf
    whenever the tensor holds one. It can also overflow for huge but finite values, so only then is each
    element asked exactly. A max-abs norm would need no second look, but it is far slower on a CPU.
    """
    params = [_local(p) for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device if params else torch.device("cpu")
    finite = bool(torch.stack(torch._foreach_norm(params, 2)).isfinite().all()) if params else True
    if not finite:
        finite = all(bool(p.isfinite().all()) for p in params)
    return all_processes(finite, device)


def train_step(parts: StepParts, images: torch.Tensor, tokens: torch.Tensor, lr: float) -> StepResult:
    """One optimizer step. A non-finite loss or gradient norm skips the update; an update that leaves a
    parameter non-finite cannot be undone, and is reported for the caller to stop. `non_finite` names
    which of the three it was. Every process takes the same decision (they look at global values)."""
    set_lr(parts.optimizer, lr)
    loss = parts.loss(*parts.forward(images, tokens))
    value = _global_loss(loss)
    if not math.isfinite(value):
        parts.optimizer.zero_grad(set_to_none=True)
        return StepResult(value, float("nan"), "loss")
    loss.backward()
    return _apply_gradients(parts, value)


def gradient_cache_step(
    parts: StepParts, images: torch.Tensor, tokens: torch.Tensor, lr: float, micro_batch: int
) -> StepResult:
    """`train_step`'s update, with activations held for `micro_batch` samples at a time (see the module
    docstring). Same results and non-finite handling as `train_step`."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if _training_batchnorm(parts.model):
        raise ValueError(
            "the gradient cache needs micro-batch independent encoders: a BatchNorm in training mode "
            "(a ResNet image tower) normalizes by micro-batch statistics; lock the image tower or use a ViT"
        )
    set_lr(parts.optimizer, lr)
    pieces = _micro_batches(images, tokens, micro_batch)
    # Pass 1: features only. Each micro-batch's RNG state is kept so that pass 2 draws the same patches.
    rng_states, cached = [], []
    with torch.no_grad():
        for piece_images, piece_tokens in pieces:
            rng_states.append(_rng_state(images.device))
            cached.append(parts.forward(piece_images, piece_tokens))
    # The loss on the cached features as leaves; the temperature enters as a detached copy, so that its
    # gradient reaches the parameter inside pass 2's last forward, where DDP expects it.
    leaves = [torch.cat([c[i] for c in cached]).requires_grad_() for i in (0, 1)]
    temperature = [_leaf(t) for t in cached[-1][2:]]
    loss = parts.loss(*leaves, *temperature)
    value = _global_loss(loss)
    if not math.isfinite(value):
        parts.optimizer.zero_grad(set_to_none=True)
        return StepResult(value, float("nan"), "loss")
    loss.backward()
    feature_grads = [leaf.grad.split(micro_batch) for leaf in leaves]
    # Pass 2: the same encodings with autograd, each backpropagating its slice of the feature gradient. It
    # repeats pass 1's draws, so it leaves the RNG where pass 1 did: the next step draws as without pass 2.
    last = len(pieces) - 1
    for i, ((piece_images, piece_tokens), state) in enumerate(zip(pieces, rng_states, strict=True)):
        _set_rng_state(state, images.device)
        with parts.no_sync() if i < last else contextlib.nullcontext():
            outputs = parts.forward(piece_images, piece_tokens)
            grads = [_piece(g, i, piece_images.shape[0]) for g in feature_grads]
            if i == last:
                grads += [None if t is None else t.grad for t in temperature]
            # A locked tower (LiT) or a fixed temperature has nothing to backpropagate into.
            trained = [
                (o, g) for o, g in zip(outputs, grads, strict=False) if o is not None and o.requires_grad
            ]
            if trained:
                torch.autograd.backward([o for o, _ in trained], [g for _, g in trained])
    return _apply_gradients(parts, value)


StepFunction = Callable[[StepParts, torch.Tensor, torch.Tensor, float], StepResult]


def step_function(micro_batch: int) -> StepFunction:
    """The step strategy for `data.micro_batch_size`: 0 is `train_step`, else `gradient_cache_step` with
    it bound, so both are called with `train_step`'s arguments."""
    if micro_batch == 0:
        return train_step

    def step(parts: StepParts, images: torch.Tensor, tokens: torch.Tensor, lr: float) -> StepResult:
        return gradient_cache_step(parts, images, tokens, lr, micro_batch)

    return step


def _global_loss(loss: torch.Tensor) -> float:
    """The global batch's loss: the processes' shares are scaled so that their mean is it."""
    return sum_over_processes(loss.detach()).item() / process_count()


def _micro_batches(
    images: torch.Tensor, tokens: torch.Tensor, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`size`-sample pieces; as many on every process (some maybe empty), since every forward of a sharded
    model is a collective operation."""
    pieces = max(1, max(math.ceil(n / size) for n in row_counts(images.shape[0], images.device)))
    return [(images[i * size : (i + 1) * size], tokens[i * size : (i + 1) * size]) for i in range(pieces)]


def _piece(grad_pieces: tuple[torch.Tensor, ...], i: int, rows: int) -> torch.Tensor:
    return grad_pieces[i] if i < len(grad_pieces) else grad_pieces[0][:rows]


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(t.requires_grad)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (FSDP2 parameters are DTensors), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _apply_gradients(parts: StepParts, loss: float) -> StepResult:
    """Clip, check and apply the accumulated gradients, then clamp the temperature."""
    max_norm = parts.grad_clip if parts.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), max_norm)
    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    if not math.isfinite(grad_norm):
        parts.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, "gradient norm")
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if not parameters_finite(parts.optimizer):
        return StepResult(loss, grad_norm, "parameters")
    clamp_logit_scale(parts.model.logit_scale, parts.max_log_scale)
    return StepResult(loss, grad_norm)


def _training_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
