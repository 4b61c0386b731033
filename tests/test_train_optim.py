import dataclasses
import itertools
import math

import pytest
import torch

from clipforge.models import create_model, get_config
from clipforge.models.layers import LayerNorm
from clipforge.train.optim import WarmupCosine, make_optimizer, parameter_role, weight_decay_groups


def test_weight_decay_only_on_weights():
    model = create_model("RN-Tiny-64")
    decay, no_decay = weight_decay_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    for pid, name in names.items():
        is_gain_or_bias = name.endswith(
            ("bias", "ln_1.weight", "ln_2.weight", "ln_final.weight", "bn1.weight")
        )
        if is_gain_or_bias or name in ("logit_scale", "visual.bn3.weight"):
            assert pid not in decayed, name
    for name in (
        "token_embedding.weight",
        "text_projection",
        "visual.attnpool.q_proj.weight",
        "visual.conv1.weight",
    ):
        assert id(dict(model.named_parameters())[name]) in decayed, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_roles_come_from_the_module_not_the_name():
    ln = LayerNorm(4)
    assert parameter_role(ln, ln.weight) == "gain"
    assert parameter_role(ln, ln.bias) == "bias"
    model = create_model("ViT-Nano-16-64")
    assert parameter_role(model, model.logit_scale) == "temperature"
    assert parameter_role(model, model.text_projection) == "weight"


def test_paper_adam_settings_are_used():
    model = create_model("ViT-Nano-16-64")
    opt = make_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["eps"] == 1e-6


def test_warmup_then_cosine():
    s = WarmupCosine(peak_lr=1.0, warmup_steps=10, total_steps=110, final_lr=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_siglip_bias_is_not_decayed_and_frozen_parameters_are_left_out():
    config = dataclasses.replace(get_config("ViT-Nano-16-64"), logit_bias=True)
    model = create_model(config)
    assert parameter_role(model, model.logit_bias) == "bias"
    decay, no_decay = weight_decay_groups(model, 0.2)
    assert any(p is model.logit_bias for p in no_decay["params"])
    assert not any(p is model.logit_bias for p in decay["params"])
    model.lock_tower("text")
    model.logit_scale.requires_grad_(False)
    optimizer = make_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = {id(p) for p in model.tower_parameters("text")} | {id(model.logit_scale)}
    assert not held & frozen
    assert held == {id(p) for p in model.parameters()} - frozen
