"""CLIP: an image tower and a text tower projected into one embedding space (Radford et al. 2021).

The text tower lives directly on `CLIP` (not in a sub-module) because that is where OpenAI's weight files
put it: `token_embedding.weight`, `transformer.resblocks.0...`, `ln_final`, `text_projection`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.config import CLIPConfig, get_config
from clipforge.models.layers import LayerNorm, Transformer
from clipforge.models.modified_resnet import ModifiedResNet
from clipforge.models.vision_transformer import VisionTransformer

# Vision towers by `VisionConfig.kind`: architectures are chosen by config, never by model name.
VISION_TOWERS: dict[str, type[nn.Module]] = {"vit": VisionTransformer, "resnet": ModifiedResNet}

# The paper's initial temperature: logits are scaled by 1/0.07, learned in log space.
INIT_LOGIT_SCALE = math.log(1 / 0.07)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VISION_TOWERS[config.vision.kind](config.vision, config.embed_dim, config.activation)

        t = config.text
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, config.activation)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The initialization of OpenAI's released training code, so training from scratch starts there."""
        width = self.config.text.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_scaled_normal()
        nn.init.normal_(self.text_projection, std=width**-0.5)
        nn.init.constant_(self.logit_scale, INIT_LOGIT_SCALE)
        self.visual.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks in the backward pass (less memory, ~30% more compute)."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> (B, embed_dim) image features, not L2-normalized."""
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, T <= context_length -> (B, embed_dim) text features, not L2-normalized.

        The text is read at its end-of-text token, which has the largest id in the vocabulary.
        """
        B, T = tokens.shape
        if self.context_length < T:
            raise ValueError(f"got {T} tokens per text; this model's context length is {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:T].to(self.dtype)  # (B, T, C)
        x = self.transformer(x, causal=True)
        x = x[torch.arange(B, device=x.device), tokens.argmax(dim=-1)]  # (B, C) at EOT
        # LayerNorm acts per token, so pooling first and normalizing one token per text is exact.
        return self.ln_final(x) @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: (logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img])."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def create_model(name_or_config: str | CLIPConfig) -> CLIP:
    """A freshly initialized model from a registered name (see `available_models()`) or a config."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return CLIP(config)
