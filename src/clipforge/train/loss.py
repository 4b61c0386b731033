"""The paper's symmetric contrastive loss (Radford et al. 2021, Figure 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The paper clips the learned temperature so that logits are scaled by at most 100.
MAX_LOGIT_SCALE = math.log(100)


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


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.nn.Parameter, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Keep the temperature where the paper keeps it: call after every optimizer step."""
    logit_scale.clamp_(0, max_value)
