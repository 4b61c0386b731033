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
4. step the optimizer once, with the same checks as `train_step`.
Peak activation memory is that of one micro-batch, at the price of encoding everything twice. The gradient
is the full-batch one up to floating-point summation order, provided both encodings of a micro-batch are
the same function: the torch RNG is rewound for the second (patch dropout draws from it), and a BatchNorm in
training mode, which would normalize by micro-batch statistics, is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipforge.models import CLIP
from clipforge.train.loss import MAX_LOGIT_SCALE, clamp_logit_scale, contrastive_loss, sigmoid_loss
from clipforge.train.optim import set_lr


@dataclass
class StepResult:
    loss: float
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


def compute_loss(
    model: CLIP, image_features: torch.Tensor, text_features: torch.Tensor, loss_name: str
) -> torch.Tensor:
    """The loss `loss_name` (`loss.name`) of normalized features, with the model's temperature (and bias)."""
    if loss_name == "sigmoid":
        return sigmoid_loss(image_features, text_features, model.logit_scale, model.logit_bias)
    return contrastive_loss(image_features, text_features, model.logit_scale)


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


def parameters_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter the optimizer updates is finite.

    The 2-norm of each tensor (one fused kernel on CUDA, vectorized sums on a CPU, one sync) is NaN or inf
    whenever the tensor holds one. It can also overflow for huge but finite values, so only then is each
    element asked exactly. A max-abs norm would need no second look, but it is far slower on a CPU.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if bool(torch.stack(torch._foreach_norm(params, 2)).isfinite().all()):
        return True
    return all(bool(p.isfinite().all()) for p in params)


def train_step(
    model: CLIP,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    tokens: torch.Tensor,
    lr: float,
    precision: str,
    grad_clip: float,
    loss_name: str = "contrastive",
    max_log_scale: float = MAX_LOGIT_SCALE,
) -> StepResult:
    """One optimizer step. A non-finite loss or gradient norm skips the update; an update that leaves a
    parameter non-finite cannot be undone, and is reported for the caller to stop. `non_finite` names
    which of the three it was.

    `max_log_scale` bounds `model.logit_scale` after the step (`loss.max_logit_scale`, as a log).
    """
    set_lr(optimizer, lr)
    image_features, text_features = encode(model, images, tokens, precision)
    loss = compute_loss(model, image_features, text_features, loss_name)
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.item(), float("nan"), "loss")
    loss.backward()
    return _apply_gradients(model, optimizer, loss.item(), grad_clip, max_log_scale)


def gradient_cache_step(
    model: CLIP,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batch: int,
    lr: float,
    precision: str,
    grad_clip: float,
    loss_name: str = "contrastive",
    max_log_scale: float = MAX_LOGIT_SCALE,
) -> StepResult:
    """`train_step`'s update, with activations held for `micro_batch` samples at a time (see the module
    docstring). Same arguments, results and non-finite handling as `train_step`."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if _training_batchnorm(model):
        raise ValueError(
            "the gradient cache needs micro-batch independent encoders: a BatchNorm in training mode "
            "(a ResNet image tower) normalizes by micro-batch statistics; lock the image tower or use a ViT"
        )
    set_lr(optimizer, lr)
    pieces = list(zip(images.split(micro_batch), tokens.split(micro_batch), strict=True))
    # Pass 1: features only. Each micro-batch's RNG state is kept so that pass 2 draws the same patches.
    rng_states, cached = [], []
    with torch.no_grad():
        for piece_images, piece_tokens in pieces:
            rng_states.append(_rng_state(images.device))
            cached.append(encode(model, piece_images, piece_tokens, precision))
    image_features = torch.cat([i for i, _ in cached]).requires_grad_()
    text_features = torch.cat([t for _, t in cached]).requires_grad_()
    loss = compute_loss(model, image_features, text_features, loss_name)
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.item(), float("nan"), "loss")
    loss.backward()  # into the logit scale / bias and the feature leaves
    image_grads = image_features.grad.split(micro_batch)
    text_grads = text_features.grad.split(micro_batch)
    # Pass 2: the same encodings with autograd, each backpropagating its slice of the feature gradient. It
    # repeats pass 1's draws, so it leaves the RNG where pass 1 did: the next step draws as without pass 2.
    for (piece_images, piece_tokens), state, image_grad, text_grad in zip(
        pieces, rng_states, image_grads, text_grads, strict=True
    ):
        _set_rng_state(state, images.device)
        features = encode(model, piece_images, piece_tokens, precision)
        # A locked tower (LiT) has nothing to backpropagate into.
        trained = [(f, g) for f, g in zip(features, (image_grad, text_grad), strict=True) if f.requires_grad]
        if trained:
            torch.autograd.backward([f for f, _ in trained], [g for _, g in trained])
    return _apply_gradients(model, optimizer, loss.item(), grad_clip, max_log_scale)


StepFunction = Callable[..., StepResult]


def step_function(micro_batch: int) -> StepFunction:
    """The step strategy for `data.micro_batch_size`: 0 is `train_step`, else `gradient_cache_step` with
    it bound, so both are called with `train_step`'s arguments."""
    if micro_batch == 0:
        return train_step

    def step(model: CLIP, optimizer: torch.optim.Optimizer, images, tokens, *args, **kwargs) -> StepResult:
        return gradient_cache_step(model, optimizer, images, tokens, micro_batch, *args, **kwargs)

    return step


def _apply_gradients(
    model: CLIP, optimizer: torch.optim.Optimizer, loss: float, grad_clip: float, max_log_scale: float
) -> StepResult:
    """Clip, check and apply the accumulated gradients, then clamp the temperature."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, "gradient norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not parameters_finite(optimizer):
        return StepResult(loss, grad_norm, "parameters")
    clamp_logit_scale(model.logit_scale, max_log_scale)
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
