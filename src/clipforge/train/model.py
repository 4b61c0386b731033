"""The model a training config describes: the architecture sized to the tokenizer and the data, its starting
weights, and the levers that change how it trains (loss parameters, temperature, patch dropout, locked
towers). Each lever is off by default, which leaves the paper's recipe exactly as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from clipforge.models import CLIP, CLIPConfig, create_model, get_config
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
    for tower, locked in (("image", cfg.model.lock_image), ("text", cfg.model.lock_text)):
        if locked:
            model.lock_tower(tower)
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
    return dataclasses.replace(config, text=text, logit_bias=cfg.loss.name == "sigmoid")


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
    use for one (it is dropped).
    """
    from clipforge.checkpoints import load_model

    state = load_model(source).state_dict()
    if model.logit_bias is not None and "logit_bias" not in state:
        log.info("%s has no logit_bias: it starts at loss.init_bias", source)
        state["logit_bias"] = model.logit_bias.detach().clone()
    elif model.logit_bias is None and state.pop("logit_bias", None) is not None:
        log.info("%s has a logit_bias, unused by the contrastive loss: dropped", source)
    model.load_state_dict(state, strict=True)
