"""The model a training config describes: the architecture sized to the tokenizer and the data, its starting
weights, and the levers that change how it trains (loss parameters, temperature, patch dropout, locked
towers and blocks, frozen BatchNorm statistics). Each lever is off by default, which leaves the paper's
recipe exactly as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types

import torch
from torch import nn

from clipforge.models import CLIP, CLIPConfig, create_model, get_config
from clipforge.models.resize import fit_positional_embeddings
from clipforge.train.config import LossConfig, TrainConfig
from clipforge.train.loss import LOSS_DEFAULTS

log = logging.getLogger("clipforge.train")


def build_model(cfg: TrainConfig, vocab_size: int) -> CLIP:
    """The configured model, ready for `build_optimizer` (which leaves out what is frozen here)."""
    model = create_model(model_config(cfg, vocab_size))
    init_temperature(model, cfg.loss)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    model.logit_scale.requires_grad_(cfg.loss.learn_temperature)
    m = cfg.model
    for tower, locked, unlocked in (
        ("image", m.lock_image, m.lock_image_unlocked_blocks),
        ("text", m.lock_text, m.lock_text_unlocked_blocks),
    ):
        if locked:
            lock_tower(model, tower, unlocked)
    if m.freeze_batchnorm:
        freeze_batchnorm(model.visual)
    model.set_patch_dropout(cfg.model.patch_dropout)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    if cfg.model.compile:
        # Compile the towers in place (Module.compile): parameter names, and so checkpoints, are unchanged.
        model.visual.compile()
        model.transformer.compile()
    return model


def model_config(cfg: TrainConfig, vocab_size: int) -> CLIPConfig:
    """The named architecture with the tokenizer's vocabulary, the data's context length, and a logit
    bias when the loss needs one."""
    config = get_config(cfg.model.name)
    text = dataclasses.replace(config.text, vocab_size=vocab_size, context_length=cfg.data.context_length)
    vision = config.vision
    if cfg.model.image_size:
        vision = dataclasses.replace(vision, image_size=cfg.model.image_size)
    return dataclasses.replace(config, vision=vision, text=text, logit_bias=cfg.loss.name == "sigmoid")


def temperature_settings(loss: LossConfig) -> tuple[float, float]:
    """(initial temperature, largest logit scale) for this loss config, the loss's defaults filled in."""
    defaults = LOSS_DEFAULTS[loss.name]
    temperature = defaults.init_temperature if loss.init_temperature is None else loss.init_temperature
    max_scale = defaults.max_logit_scale if loss.max_logit_scale is None else loss.max_logit_scale
    if 1 / temperature > max_scale:
        # Otherwise the first clamp would silently move the temperature away from what was asked for.
        raise ValueError(
            f"loss.init_temperature {temperature} scales the logits by {1 / temperature:.4g}, more than "
            f"loss.max_logit_scale {max_scale}"
        )
    return temperature, max_scale


def max_log_scale(loss: LossConfig) -> float:
    """The clamp for `model.logit_scale`, which holds the log of the scale."""
    return math.log(temperature_settings(loss)[1])


@torch.no_grad()
def init_temperature(model: CLIP, loss: LossConfig) -> None:
    """Set the starting temperature (and SigLIP's bias, if the model has one) of a fresh model."""
    temperature, _ = temperature_settings(loss)
    model.logit_scale.fill_(math.log(1 / temperature))
    if model.logit_bias is not None:
        model.logit_bias.fill_(loss.init_bias)


def load_pretrained(model: CLIP, source: str) -> None:
    """Start from the weights of a file, directory or release name: every tensor they hold, strictly.

    The logit bias is the one tensor allowed to differ, since the loss decides it: weights trained with
    the contrastive loss have none (a sigmoid run keeps its initial bias), and a contrastive run has no
    use for one (it is dropped). Positional embeddings are resized to this model's image size and
    context length (`clipforge.models.resize`).
    """
    from clipforge.checkpoints import load_model

    saved = load_model(source)
    state = fit_positional_embeddings(saved.state_dict(), model.state_dict(), model.config.vision.kind)
    for what, before, now in (
        ("image size", saved.config.vision.image_size, model.config.vision.image_size),
        ("context length", saved.config.text.context_length, model.config.text.context_length),
    ):
        if before != now:
            log.info("%s: %s %d, resized to %d", source, what, before, now)
    if model.logit_bias is not None and "logit_bias" not in state:
        log.info("%s has no logit_bias: it starts at loss.init_bias", source)
        state["logit_bias"] = model.logit_bias.detach().clone()
    elif model.logit_bias is None and state.pop("logit_bias", None) is not None:
        log.info("%s has a logit_bias, unused by the contrastive loss: dropped", source)
    model.load_state_dict(state, strict=True)


# ---- locking blocks and freezing BatchNorm statistics -----------------------------------------------------

# What runs after the blocks of each tower (attributes of its root module), by `VisionConfig.kind` for the
# image tower. Everything else in a tower runs before its blocks: embeddings, the ResNet stem, ln_pre.
IMAGE_HEADS = {"vit": ("ln_post", "proj"), "resnet": ("attnpool",)}
TEXT_HEAD = ("ln_final", "text_projection")
TEXT_ROOTS = ("token_embedding", "transformer", "ln_final")  # the text tower's modules on `CLIP`


def _transformer_blocks(visual: nn.Module) -> list[nn.Module]:
    return list(visual.transformer.resblocks)


def _bottlenecks(visual: nn.Module) -> list[nn.Module]:
    return [
        block for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4) for block in stage
    ]


# The residual blocks of each image tower, in the order they run, by `VisionConfig.kind`.
IMAGE_BLOCKS = {"vit": _transformer_blocks, "resnet": _bottlenecks}


def tower_blocks(model: CLIP, tower: str) -> list[nn.Module]:
    """The residual blocks of a tower in the order they run: transformer blocks, or a ResNet's
    bottlenecks over its four stages."""
    if tower == "text":
        return list(model.transformer.resblocks)
    return IMAGE_BLOCKS[model.config.vision.kind](model.visual)


def tower_layers(model: CLIP, tower: str) -> list[list[nn.Parameter]]:
    """A tower's parameters by layer: [embeddings (layer 0), block 1, ..., block depth, head (depth + 1)].

    The head is what follows the blocks (`IMAGE_HEADS`, `TEXT_HEAD`); layer 0 is every other parameter of
    the tower (`CLIP.tower_parameters`). Each parameter is in exactly one layer.
    """
    root, heads = (
        (model, TEXT_HEAD) if tower == "text" else (model.visual, IMAGE_HEADS[model.config.vision.kind])
    )
    blocks = [list(block.parameters()) for block in tower_blocks(model, tower)]
    head = []
    for name in heads:
        part = getattr(root, name)
        head += list(part.parameters()) if isinstance(part, nn.Module) else [part]
    placed = {id(p) for layer in (*blocks, head) for p in layer}
    embeddings = [p for p in model.tower_parameters(tower) if id(p) not in placed]
    return [embeddings, *blocks, head]


def lock_tower(model: CLIP, tower: str, unlocked_blocks: int = 0) -> None:
    """Lock a tower (LiT) but for its last `unlocked_blocks` blocks and its head, which keep training.

    0 locks it whole (`CLIP.lock_tower`: no gradients, eval mode). Otherwise the frozen part gets no
    gradients and its modules stay in eval mode (`keep_in_eval`): a frozen block's BatchNorm statistics do
    not move. The tower itself follows `train()`, so its trainable blocks (and patch dropout) train.
    """
    if unlocked_blocks == 0:
        model.lock_tower(tower)
        return
    layers = tower_layers(model, tower)
    depth = len(layers) - 2
    if not 0 < unlocked_blocks <= depth:
        raise ValueError(f"the {tower} tower has {depth} blocks: cannot unlock {unlocked_blocks}")
    for layer in layers[: depth + 1 - unlocked_blocks]:
        for param in layer:
            param.requires_grad_(False)
    roots = [model.visual] if tower == "image" else [getattr(model, name) for name in TEXT_ROOTS]
    for root in roots:
        _keep_frozen_in_eval(root)


def _keep_frozen_in_eval(module: nn.Module) -> None:
    """`keep_in_eval` the largest sub-modules whose parameters are all frozen."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        keep_in_eval(module)
        return
    for child in module.children():
        _keep_frozen_in_eval(child)


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def keep_in_eval(module: nn.Module) -> None:
    """Hold `module` and everything under it in eval mode whatever `train()` is told later.

    An instance-level `train` (bound with MethodType, so `copy.deepcopy` rebinds it to the copy) shadows
    the class's; `nn.Module.train` of a parent calls it on its children.
    """
    module.train = types.MethodType(_eval_only_train, module)  # type: ignore[method-assign]
    module.eval()


def freeze_batchnorm(tower: nn.Module) -> None:
    """Keep every BatchNorm of `tower` in eval mode: it normalizes with, and never updates, its running
    statistics. Its gain and bias still train unless they are locked."""
    norms = [m for m in tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f"freeze_batchnorm: this {type(tower).__name__} has no BatchNorm layers")
    for norm in norms:
        keep_in_eval(norm)
