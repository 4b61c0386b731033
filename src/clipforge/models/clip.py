"""CLIP: an image tower and a text tower projected into one embedding space (Radford et al. 2021).

The text tower lives directly on `CLIP` (not in a sub-module) because that is where OpenAI's weight files
put it: `token_embedding.weight`, `transformer.resblocks.0...`, `ln_final`, `text_projection`.

For training recipes beyond the paper's, a model can carry a SigLIP logit bias (`CLIPConfig.logit_bias`),
drop patch tokens in training (`set_patch_dropout`) and keep a tower frozen (`lock_tower`, LiT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.config import CLIPConfig, get_config
from clipforge.models.layers import LayerNorm, Transformer
from clipforge.models.modified_resnet import ModifiedResNet
from clipforge.models.patch_dropout import PatchDropout
from clipforge.models.vision_transformer import VisionTransformer

# Vision towers by `VisionConfig.kind`: architectures are chosen by config, never by model name.
VISION_TOWERS: dict[str, type[nn.Module]] = {"vit": VisionTransformer, "resnet": ModifiedResNet}

# The paper's initial temperature: logits are scaled by 1/0.07, learned in log space.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
# SigLIP's initial bias (Zhai et al. 2023, §3.2): every pair starts out looking negative, as nearly all are.
INIT_LOGIT_BIAS = -10.0

TOWERS = ("image", "text")


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.locked_towers: set[str] = set()  # see lock_tower
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
        # Registered as None without the bias, so that state_dict() has exactly OpenAI's keys.
        self.register_parameter("logit_bias", nn.Parameter(torch.empty(())) if config.logit_bias else None)
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
        if self.logit_bias is not None:
            nn.init.constant_(self.logit_bias, INIT_LOGIT_BIAS)
        self.visual.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks in the backward pass (less memory, ~30% more compute)."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def set_patch_dropout(self, prob: float) -> None:
        """Drop this fraction of the image's patch tokens in training mode (FLIP); 0 turns it off."""
        if not isinstance(self.visual, VisionTransformer):
            if prob == 0:
                return
            # A convolutional tower needs the whole pixel grid: it has no tokens to drop.
            raise ValueError(
                f"patch dropout needs a ViT image tower; this model's is a {type(self.visual).__name__}"
            )
        self.visual.patch_dropout = PatchDropout(prob)
        self.visual.patch_dropout.train(self.visual.training)

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        """The parameters of the "image" tower (`visual.*`, its projection included) or of the "text"
        tower (embeddings, transformer, final LayerNorm and projection); the temperature and bias are
        in neither."""
        if tower == "image":
            return list(self.visual.parameters())
        if tower == "text":
            modules = (self.token_embedding, self.transformer, self.ln_final)
            bare = [self.positional_embedding, self.text_projection]
            return [p for m in modules for p in m.parameters()] + bare
        raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")

    def _tower_modules(self, tower: str) -> tuple[nn.Module, ...]:
        if tower == "image":
            return (self.visual,)
        return (self.token_embedding, self.transformer, self.ln_final)

    def lock_tower(self, tower: str) -> None:
        """Freeze a tower (LiT, Zhai et al. 2022): its parameters get no gradients (so an optimizer built
        afterwards leaves them out) and it stays in eval mode whatever `train()` is told, so BatchNorm
        statistics do not move and training-only layers (patch dropout) are off."""
        for param in self.tower_parameters(tower):
            param.requires_grad_(False)
        self.locked_towers.add(tower)
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for tower in self.locked_towers:
            for module in self._tower_modules(tower):
                module.eval()
        return self

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
        """Scaled cosine similarities: (logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img]).

        With a logit bias (SigLIP) it is added, so `logits.sigmoid()` is the probability that a pair
        matches; a softmax over either axis is unaffected by it.
        """
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()


def create_model(name_or_config: str | CLIPConfig) -> CLIP:
    """A freshly initialized model from a registered name (see `available_models()`) or a config."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return CLIP(config)
