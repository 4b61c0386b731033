"""The training losses: CLIP's symmetric contrastive loss (Radford et al. 2021, Figure 3) and SigLIP's
pairwise sigmoid loss (Zhai et al. 2023), with the temperature conventions of each.

Both take L2-normalized features and are written so that data-parallel training can plug in later
without changing them: they score this process's images against any block of texts, told where this
process's own pairs sit in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.nn.Parameter, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Keep the temperature where the paper keeps it: call after every optimizer step.

    `max_value` is a log, like the parameter; the floor 0 (logits never scaled down) is OpenAI's.
    """
    logit_scale.clamp_(0, max_value)
