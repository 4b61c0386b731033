"""The training levers, each off by default: the sigmoid loss, temperature options, patch dropout and
locked towers, through the config, the model the trainer builds, and short runs on the synthetic set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from clipforge.checkpoints import load_model, save
from clipforge.configs import load_toml
from clipforge.models import create_model
from clipforge.train.checkpointing import list_checkpoints
from clipforge.train.config import TrainConfig
from clipforge.train.loop import Trainer, build_model, train
from clipforge.train.model import model_config
from clipforge.train.steps import train_step
from conftest import tiny_config  # with conftest's `tokenizer_dir`: a 600-id vocabulary

PAPER_LOGIT_SCALE = torch.tensor(math.log(1 / 0.07)).item()  # as a float32 parameter holds it


def losses(run_dir: Path) -> list[float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_recipe_tables_and_flags_set_every_lever(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "[model]\npatch_dropout = 0.5\nlock_text = true\n"
        '[loss]\nname = "sigmoid"\ninit_temperature = 0.2\nlearn_temperature = false\n'
        "max_logit_scale = 50.0\ninit_bias = -5.0\n"
    )
    cfg = load_toml(TrainConfig, recipe)
    assert (cfg.model.patch_dropout, cfg.model.lock_image, cfg.model.lock_text) == (0.5, False, True)
    assert (cfg.loss.name, cfg.loss.init_temperature, cfg.loss.learn_temperature) == ("sigmoid", 0.2, False)
    assert (cfg.loss.max_logit_scale, cfg.loss.init_bias) == (50.0, -5.0)
    default = TrainConfig()
    assert default.loss.name == "contrastive" and default.model.patch_dropout == 0.0
    assert not (default.model.lock_image or default.model.lock_text) and default.loss.learn_temperature
    for bad, message in [
        ('[loss]\nname = "softmax"', "not one of 'contrastive', 'sigmoid'"),
        ("[loss]\ninit_temperature = 0", r"loss\.init_temperature = 0\.0: must be a finite number > 0"),
        ("[loss]\nmax_logit_scale = 0.5", r"loss\.max_logit_scale = 0\.5: must be at least 1"),
        ("[model]\npatch_dropout = 1.0", r"model\.patch_dropout = 1\.0: must be in \[0, 1\)"),
        ("[model]\npatch_dropout = 0.5\nlock_image = true", "no effect with model.lock_image"),
    ]:
        recipe.write_text(bad)
        with pytest.raises(ValueError, match=message):
            load_toml(TrainConfig, recipe)


def test_default_model_is_the_papers(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    model = build_model(tiny_config(tmp_path, tokenizer_dir), 600)
    assert model.logit_bias is None and "logit_bias" not in model.state_dict()
    assert model.logit_scale.item() == PAPER_LOGIT_SCALE and model.logit_scale.requires_grad
    assert model.visual.patch_dropout.prob == 0.0 and not model.locked_towers


def test_sigmoid_run_starts_at_siglips_values_learns_and_checkpoints_the_bias(tmp_path, tokenizer_dir):
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, "--loss.name", "sigmoid", "--schedule.steps", "30")
    trainer = Trainer(cfg)
    assert trainer.model.logit_scale.item() == pytest.approx(math.log(10))  # t = 10
    assert trainer.model.logit_bias.item() == -10.0
    assert trainer.parts.max_log_scale == math.inf  # SigLIP does not clamp
    trainer.run()
    curve = losses(tmp_path / "run")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["logit_bias"] == pytest.approx(trainer.model.logit_bias.item())
    assert trainer.model.logit_bias.item() != -10.0  # it learns
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    loaded = load_model(checkpoint)
    assert loaded.config.logit_bias and torch.equal(loaded.logit_bias, trainer.model.logit_bias.detach())
    # Resuming restores the bias strictly, and the run goes on.
    more = tiny_config(tmp_path / "run", tokenizer_dir, "--loss.name", "sigmoid", "--schedule.steps", "32")
    assert train(more, resume="latest").step == 32


def test_temperature_options(tmp_path, tokenizer_dir):
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, "--loss.init_temperature", "0.05")
    model = build_model(cfg, 600)
    assert model.logit_scale.item() == pytest.approx(math.log(20))
    fixed = tiny_config(tmp_path / "fixed", tokenizer_dir, "--loss.learn_temperature", "false")
    trainer = Trainer(fixed)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not trainer.model.logit_scale.requires_grad and id(trainer.model.logit_scale) not in held
    trainer.run()
    assert trainer.model.logit_scale.item() == PAPER_LOGIT_SCALE
    with pytest.raises(ValueError, match=r"scales the logits by 50.*more than loss.max_logit_scale 20"):
        build_model(tiny_config(tmp_path, tokenizer_dir, "--loss.init_temperature", "0.02",
                                "--loss.max_logit_scale", "20"), 600)  # fmt: skip


@pytest.mark.parametrize(("loss", "max_scale", "expected"), [
    ("contrastive", None, 100.0), ("contrastive", 20.0, 20.0), ("sigmoid", None, 200.0),
])  # fmt: skip
def test_logit_scale_is_clamped_as_configured(tmp_path, tokenizer_dir, loss, max_scale, expected):
    extra = ["--loss.name", loss] + (["--loss.max_logit_scale", str(max_scale)] if max_scale else [])
    trainer = Trainer(tiny_config(tmp_path, tokenizer_dir, *extra))
    model = trainer.model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200))  # above the contrastive clamp
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 599, (4, 16))
    tokens[:, -1] = 599
    train_step(trainer.parts, images, tokens, 1e-6)
    assert model.logit_scale.exp().item() == pytest.approx(expected, rel=1e-4)


def test_patch_dropout_run_trains_a_vit_on_fewer_tokens(tmp_path, tokenizer_dir):
    extra = ["--model.patch_dropout", "0.5", "--schedule.steps", "4"]
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, *extra)
    trainer = Trainer(cfg)
    assert trainer.model.visual.patch_dropout.prob == 0.5
    seen = []
    trainer.model.visual.transformer.register_forward_pre_hook(lambda _, a: seen.append(a[0].shape[1]))
    trainer.run()
    assert seen[0] == 1 + 2  # ViT-Micro-16-32: 4 patches, 2 kept, plus the class token
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))
    resnet = tiny_config(tmp_path, tokenizer_dir, *extra, "--model.name", "RN-Tiny-64")
    with pytest.raises(ValueError, match="patch dropout needs a ViT"):
        build_model(resnet, 600)


@pytest.mark.parametrize(("locked", "free"), [("image", "text"), ("text", "image")])
def test_locked_tower_does_not_change_and_is_not_optimized(tmp_path, tokenizer_dir, locked, free):
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, f"--model.lock_{locked}", "true",
                      "--schedule.steps", "4", "--eval.every", "2")  # fmt: skip
    trainer = Trainer(cfg)
    model = trainer.model
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held.isdisjoint(id(p) for p in model.tower_parameters(locked))
    assert {id(p) for p in model.tower_parameters(free)} <= held
    locked_before = snapshot(model.tower_parameters(locked))
    free_before = snapshot(model.tower_parameters(free))
    trainer.run()  # evaluation at steps 2 and 4 switches the model to eval mode and back
    assert all(torch.equal(a, b) for a, b in zip(locked_before, model.tower_parameters(locked), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(free_before, model.tower_parameters(free), strict=True))
    tower = model.visual if locked == "image" else model.transformer
    assert model.training and not tower.training


def test_lit_starts_from_pretrained_weights_and_keeps_the_locked_tower_exactly(tmp_path, tokenizer_dir):
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, "--schedule.steps", "3")
    torch.manual_seed(123)
    pretrained = create_model(model_config(cfg, 600))
    with torch.no_grad():
        pretrained.logit_scale.fill_(math.log(50))
    from_pretrained = ["--model.pretrained", str(save(pretrained, tmp_path / "pretrained"))]
    train(tiny_config(tmp_path / "run", tokenizer_dir, "--schedule.steps", "3", *from_pretrained,
                      "--model.lock_image", "true"))  # fmt: skip
    final = load_model(list_checkpoints(tmp_path / "run")[-1])
    for name, value in pretrained.visual.state_dict().items():
        assert torch.equal(final.visual.state_dict()[name], value), name
    assert not torch.equal(final.text_projection, pretrained.text_projection)
    # A sigmoid run from contrastive weights keeps their temperature and starts its bias at loss.init_bias.
    sigmoid = tiny_config(tmp_path / "s", tokenizer_dir, *from_pretrained, "--loss.name", "sigmoid",
                          "--loss.init_bias", "-4")  # fmt: skip
    model = build_model(sigmoid, 600)
    assert model.logit_scale.item() == pytest.approx(math.log(50)) and model.logit_bias.item() == -4.0
