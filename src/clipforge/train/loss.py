"""The training losses: CLIP's symmetric contrastive loss (Radford et al. 2021, Figure 3) and SigLIP's
pairwise sigmoid loss (Zhai et al. 2023), with the temperature conventions of each.

Both take L2-normalized features and are written so that data-parallel training can plug in later
without changing them: they score this process's images against any block of texts, told where this
process's own pairs sit in it. The sharded forms gather the columns from all processes themselves, and
the contrastive one can stream over them in blocks so that no (local x global) logits matrix exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipforge.distributed.world import gather_with_grad, process_rank, row_counts

# The paper clips the learned temperature so that logits are scaled by at most 100.
MAX_LOGIT_SCALE = math.log(100)


@dataclass(frozen=True)
class TemperatureDefaults:
    """A loss's temperature conventions: where it starts and how far the logit scale may grow."""

    init_temperature: float  # logits start scaled by 1 / this
    max_logit_scale: float  # the scale is clamped to at most this after every step (inf: never)


LOSS_DEFAULTS = {
    # CLIP: 1/0.07 at the start, at most 100 (Radford et al. 2021, §2.5).
    "contrastive": TemperatureDefaults(init_temperature=0.07, max_logit_scale=100.0),
    # SigLIP: t = 10 at the start, with no clamp (Zhai et al. 2023, §3.2 and the released big_vision code).
    "sigmoid": TemperatureDefaults(init_temperature=0.1, max_logit_scale=math.inf),
}


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over scaled cosine similarities.

    `image_features`, `text_features`: (B, D), L2-normalized, the pairs of this process. `logit_scale` is
    the log of the inverse temperature. With several processes, pass the features gathered from all of
    them as `all_*` (N, D) and this process's first row in them as `offset`: each local image is then
    scored against every text of the global batch, and the matching pair sits at `offset + i`.
    """
    all_images = image_features if all_image_features is None else all_image_features
    all_texts = text_features if all_text_features is None else all_text_features
    scale = logit_scale.exp()
    logits_per_image = scale * image_features @ all_texts.t()  # (B, N)
    logits_per_text = scale * text_features @ all_images.t()  # (B, N)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    offset: int | None = 0,
) -> torch.Tensor:
    """SigLIP's loss: every (image, text) pair is its own binary question, "do these match?".

    logits = exp(logit_scale) * I @ T.T + logit_bias; loss = -sum over pairs of log sigmoid(label * logit)
    divided by the number of images, with label +1 for an image's own caption and -1 for every other text.

    `image_features` (B, D): this process's images. `text_features` (M, D): a block of texts to score them
    against, in which image i's caption is row `offset + i`; `offset=None` when the block holds none of
    them. Because each pair is scored on its own (no softmax across the batch), blocks add up:
    - one process: this process's texts, offset 0 (M = B);
    - several processes, gathered: all texts, offset = this process's first row, like `contrastive_loss`;
    - several processes, chunked (the paper's memory-saving form, §3.3): this process's texts with offset
      0, plus, as each other process's texts are passed round a ring, those with offset None; sum them.
    Dividing by this process's B makes the mean over processes the global batch's loss, as the paper
    normalizes (-1/|B| times the sum over all pairs).
    """
    logits = logit_scale.exp() * image_features @ text_features.t() + logit_bias  # (B, M)
    labels = -torch.ones_like(logits)
    if offset is not None:
        rows = torch.arange(image_features.shape[0], device=logits.device)
        labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """mean_i [logsumexp_j(s q_i . k_j) - s q_i . k_(offset+i)], s = exp(logit_scale), over blocks of keys.

    The forward keeps a running log-sum-exp per row; the backward recomputes each block's logits and uses
    d loss / d logits = (softmax - onehot) / B, so only (B x chunk) logits ever exist.
    """

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, offset: int, chunk: int):
        scale = logit_scale.exp()
        lse = queries.new_full((queries.shape[0],), -math.inf)
        for start in range(0, keys.shape[0], chunk):
            lse = torch.logaddexp(lse, (scale * queries @ keys[start : start + chunk].t()).logsumexp(dim=1))
        own = scale * (queries * keys[offset : offset + queries.shape[0]]).sum(dim=1)
        ctx.save_for_backward(queries, keys, logit_scale, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse - own).mean()

    @staticmethod
    def backward(ctx, grad):
        queries, keys, logit_scale, lse = ctx.saved_tensors
        scale = logit_scale.exp()

        def d_logits(start: int, cosines: torch.Tensor) -> torch.Tensor:
            softmax = (scale * cosines - lse[:, None]).exp()  # this block's columns of each row's softmax
            return _subtract_positives(softmax, ctx.offset, start)

        d_queries, d_keys, d_scale, _ = _backward_by_blocks(queries, keys, scale, ctx.chunk, grad, d_logits)
        return d_queries, d_keys, d_scale * scale, None, None  # d/d log s = s * d/ds


def _subtract_positives(d_logits: torch.Tensor, offset: int | None, start: int) -> torch.Tensor:
    """d_logits minus the one-hot targets that fall in the block of columns starting at `start`: row i's
    positive is column offset + i (none when `offset` is None)."""
    if offset is None:
        return d_logits
    rows = torch.arange(d_logits.shape[0], device=d_logits.device)
    labels = rows + offset
    hit = (labels >= start) & (labels < start + d_logits.shape[1])
    d_logits[rows[hit], labels[hit] - start] -= 1.0
    return d_logits


def _backward_by_blocks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: torch.Tensor,
    chunk: int,
    grad: torch.Tensor,
    d_logits_of: Callable[[int, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of a loss mean_i sum_j f(s q_i . k_j) that a chunked forward computed, a block of keys
    at a time: `d_logits_of(start, cosines)` gives B * d loss / d logit for the block's columns. Returns
    d queries, d keys, d s and the sum of d loss / d logit (a bias's gradient)."""
    d_queries, d_keys = torch.zeros_like(queries), torch.zeros_like(keys)
    d_scale, d_sum = torch.zeros_like(scale), torch.zeros_like(scale)
    for start in range(0, keys.shape[0], chunk):
        block = keys[start : start + chunk]
        cosines = queries @ block.t()
        d_logits = d_logits_of(start, cosines) * (grad / queries.shape[0])
        d_queries += scale * d_logits @ block
        d_keys[start : start + block.shape[0]] = scale * d_logits.t() @ queries
        d_scale += (d_logits * cosines).sum()
        d_sum += d_logits.sum()
    return d_queries, d_keys, d_scale, d_sum


def chunked_cross_entropy(
    queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, offset: int, chunk: int
) -> torch.Tensor:
    """`F.cross_entropy(logit_scale.exp() * queries @ keys.T, offset + arange(B))`, computed `chunk` keys at a
    time in the forward and the backward pass, with the exact gradient."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of columns, got {chunk}")
    if offset < 0 or offset + queries.shape[0] > keys.shape[0]:
        end = offset + queries.shape[0]
        raise ValueError(f"labels {offset}..{end - 1} are outside the {keys.shape[0]} keys")
    return _ChunkedCrossEntropy.apply(queries, keys, logit_scale, offset, chunk)


class _ChunkedSigmoid(torch.autograd.Function):
    """sum_ij -log sigmoid(y_ij (s q_i . k_j + b)) / B over blocks of keys; y = +1 at (i, offset + i), else -1

    d loss / d logit = sigmoid(logit) - [y = +1], divided by B; the backward recomputes each block from it,
    so only (B x chunk) logits ever exist.
    """

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, offset: int | None, chunk: int):
        scale, total = logit_scale.exp(), queries.new_zeros(())
        for start in range(0, keys.shape[0], chunk):
            logits = scale * queries @ keys[start : start + chunk].t() + logit_bias
            total = total + F.softplus(logits).sum()  # -log sigmoid(-z) for every pair, as if unmatched
        if offset is not None:  # the matched pairs: -log sigmoid(z) = softplus(z) - z
            total = (
                total
                - (scale * (queries * keys[offset : offset + queries.shape[0]]).sum(1) + logit_bias).sum()
            )
        ctx.save_for_backward(queries, keys, logit_scale, logit_bias)
        ctx.offset, ctx.chunk = offset, chunk
        return total / queries.shape[0]

    @staticmethod
    def backward(ctx, grad):
        queries, keys, logit_scale, logit_bias = ctx.saved_tensors
        scale = logit_scale.exp()

        def d_logits(start: int, cosines: torch.Tensor) -> torch.Tensor:
            return _subtract_positives(torch.sigmoid(scale * cosines + logit_bias), ctx.offset, start)

        d_queries, d_keys, d_scale, d_bias = _backward_by_blocks(
            queries, keys, scale, ctx.chunk, grad, d_logits
        )
        return d_queries, d_keys, d_scale * scale, d_bias.reshape(logit_bias.shape), None, None


def chunked_sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    offset: int | None,
    chunk: int,
) -> torch.Tensor:
    """`sigmoid_loss`, computed `chunk` texts at a time in the forward and the backward pass, with the exact
    gradient: memory O(B x chunk) instead of O(B x M)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of columns, got {chunk}")
    if offset is not None and (offset < 0 or offset + image_features.shape[0] > text_features.shape[0]):
        end = offset + image_features.shape[0]
        raise ValueError(f"labels {offset}..{end - 1} are outside the {text_features.shape[0]} texts")
    return _ChunkedSigmoid.apply(image_features, text_features, logit_scale, logit_bias, offset, chunk)


def _gathered(local: torch.Tensor, world: int) -> torch.Tensor:
    """All processes' rows in rank order; a clear error if the process group does not match `world`."""
    gathered = gather_with_grad(local) if world > 1 else local
    if gathered.shape[0] != world * local.shape[0]:
        raise ValueError(
            f"{world} processes expected but gathering gave {gathered.shape[0]} rows from {local.shape[0]} "
            "local ones: is the process group initialized?"
        )
    return gathered


def sharded_contrastive_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int,
    world: int,
    chunk: int | None = None,
) -> torch.Tensor:
    """This process's share of the global batch's contrastive loss: its B images against all N = world * B
    texts, and its B texts against all N images, the matching pair at column rank * B + i.

    Each direction is a mean over this process's B rows, so the mean of the returned values over
    processes is the global loss (the mean over all N rows), and with DDP averaging gradients the update
    is a 1-process run's on the global batch. `chunk`: stream over that many columns at a time
    (`chunked_cross_entropy`). With world = 1 this is `contrastive_loss`.
    """
    all_images, all_texts = _gathered(image_local, world), _gathered(text_local, world)
    offset = rank * image_local.shape[0]
    if chunk is None:
        return contrastive_loss(image_local, text_local, logit_scale, all_images, all_texts, offset)
    per_image = chunked_cross_entropy(image_local, all_texts, logit_scale, offset, chunk)
    per_text = chunked_cross_entropy(text_local, all_images, logit_scale, offset, chunk)
    return (per_image + per_text) / 2


def sharded_sigmoid_loss(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    rank: int,
    world: int,
) -> torch.Tensor:
    """This process's share of the global batch's sigmoid loss: its B images against all N texts, divided
    by B, so the mean over processes is the global loss (-1/N times the sum over all N^2 pairs). Every pair
    is scored once, by the process holding its image. With world = 1 this is `sigmoid_loss`."""
    all_texts = _gathered(text_local, world)
    return sigmoid_loss(image_local, all_texts, logit_scale, logit_bias, offset=rank * image_local.shape[0])


@dataclass(frozen=True)
class BatchLoss:
    """The training loss of one step, as each process computes its share of it; the same code for one
    process and for many, chunked or not.

    Each process passes its own pairs' features. They are gathered from every process (with gradient), the
    local rows are scored against all N columns, and the result is scaled by B_local / (N / W): the mean
    over the W processes is then the global batch's loss, and DDP's averaged gradient is the gradient of
    one process holding the whole batch, even when the processes hold different numbers of pairs (samples
    skipped in one of them). With one process the scale is exactly 1 and this is `contrastive_loss` or
    `sigmoid_loss`.
    """

    name: str = "contrastive"  # "contrastive" or "sigmoid" (`loss.name`)
    chunk: int = 0  # stream over this many columns of the global batch at a time; 0 = all at once

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = image_features.shape[0]
        counts = row_counts(rows, image_features.device)
        offset = sum(counts[: process_rank()])
        if rows == 0:  # nothing here, but every parameter must still take part in the backward
            unused = image_features.sum() + text_features.sum() + logit_scale
            return 0.0 * (unused if logit_bias is None else unused + logit_bias)
        all_texts = gather_with_grad(text_features)
        if self.name == "sigmoid":
            if logit_bias is None:
                raise ValueError("the sigmoid loss needs the model's logit_bias (loss.name = 'sigmoid')")
            loss = (
                sigmoid_loss(image_features, all_texts, logit_scale, logit_bias, offset=offset)
                if self.chunk <= 0
                else chunked_sigmoid_loss(
                    image_features, all_texts, logit_scale, logit_bias, offset, self.chunk
                )
            )
        else:
            loss = self._contrastive(image_features, text_features, all_texts, logit_scale, offset)
        return loss * (rows * len(counts) / sum(counts))

    def _contrastive(self, images, texts, all_texts, logit_scale, offset: int) -> torch.Tensor:
        all_images = gather_with_grad(images)
        if self.chunk <= 0:
            return contrastive_loss(images, texts, logit_scale, all_images, all_texts, offset)
        per_image = chunked_cross_entropy(images, all_texts, logit_scale, offset, self.chunk)
        per_text = chunked_cross_entropy(texts, all_images, logit_scale, offset, self.chunk)
        return (per_image + per_text) / 2


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.nn.Parameter, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Keep the temperature where the paper keeps it: call after every optimizer step.

    `max_value` is a log, like the parameter; the floor 0 (logits never scaled down) is OpenAI's.
    """
    logit_scale.clamp_(0, max_value)
