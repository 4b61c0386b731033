"""Fine-tuning levers: towers locked but for their last blocks, frozen BatchNorm statistics, layer-wise
learning-rate decay, and pretrained weights started at another image size or a shorter context. Short runs
of tiny models on the synthetic set; bad values refused by `clipforge train` before anything is written."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from clipforge.checkpoints import load_model, save
from clipforge.cli import main
from clipforge.models import create_model, get_config
from clipforge.models.resize import resize_grid_embedding
from clipforge.train.loop import Trainer, build_model, build_optimizer
from clipforge.train.model import tower_layers
from clipforge.train.optim import WarmupCosine, set_lr
from conftest import MICRO_RECIPE, tiny_config  # with conftest's `tokenizer_dir`: a 600-id vocabulary

VOCAB = 600
NANO = ("--model.name", "ViT-Nano-16-64", "--data.batch_size", "8", "--data.synthetic_samples", "16")
RESNET = ("--model.name", "RN-Tiny-64", "--data.batch_size", "8", "--data.synthetic_samples", "16")


def run(tmp_path: Path, tokenizer_dir: Path, *args: str, steps: int = 3) -> Trainer:
    schedule = ("--schedule.steps", str(steps), "--schedule.warmup_steps", "1")
    cfg = tiny_config(tmp_path / "run", tokenizer_dir, *args, *schedule)
    trainer = Trainer(cfg)
    trainer.before = {n: t.detach().clone() for n, t in trainer.model.state_dict().items()}
    trainer.run()
    return trainer


def held_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def names_of(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def unchanged(trainer: Trainer, name: str) -> bool:
    return torch.equal(trainer.model.state_dict()[name], trainer.before[name])


# ---- partial locking ------------------------------------------------------------------------------------


def test_a_locked_tower_trains_only_its_last_blocks_and_head(tmp_path, tokenizer_dir):
    trainer = run(
        tmp_path, tokenizer_dir, *NANO,
        "--model.lock_image", "true", "--model.lock_image_unlocked_blocks", "1",
        "--model.lock_text", "true", "--model.lock_text_unlocked_blocks", "2",
    )  # fmt: skip
    model = trainer.model
    image, text = tower_layers(model, "image"), tower_layers(model, "text")
    trainable = [*image[2], *image[3], *[p for layer in text[1:] for p in layer], model.logit_scale]
    assert held_ids(trainer.optimizer) == {id(p) for p in trainable}
    frozen = names_of(model, [*image[0], *image[1], *text[0]])
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in frozen
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" not in frozen
    assert {"visual.conv1.weight", "visual.class_embedding", "token_embedding.weight"} <= frozen
    assert all(unchanged(trainer, name) for name in frozen)  # bit-identical after training
    for name in names_of(model, trainable):
        assert not unchanged(trainer, name), name
    # The frozen part stays in eval mode; the tower and its trainable blocks follow train().
    model.train()
    assert model.visual.training and model.visual.transformer.resblocks[1].training
    assert not model.visual.transformer.resblocks[0].training and not model.visual.conv1.training
    twin = copy.deepcopy(model).train()  # the eval hold is rebound to the copy
    assert not twin.visual.transformer.resblocks[0].training and twin.visual.transformer.resblocks[1].training


def test_unlocked_blocks_0_locks_the_whole_tower_as_before(tmp_path, tokenizer_dir):
    cfg = tiny_config(tmp_path, tokenizer_dir, *NANO, "--model.lock_image", "true")
    model = build_model(cfg, VOCAB)
    assert model.locked_towers == {"image"}
    assert not any(p.requires_grad for p in model.tower_parameters("image"))


def test_a_partly_locked_resnet_keeps_its_frozen_statistics(tmp_path, tokenizer_dir):
    trainer = run(
        tmp_path, tokenizer_dir, *RESNET,
        "--model.lock_image", "true", "--model.lock_image_unlocked_blocks", "1",
        steps=2,
    )  # fmt: skip
    locked = [n for n in trainer.before if n.startswith(("visual.bn1.", "visual.layer1.", "visual.layer3."))]
    assert any(n.endswith("running_mean") for n in locked)
    assert all(unchanged(trainer, n) for n in locked)  # weights and statistics alike
    last = "visual.layer4.0.bn1."
    assert not unchanged(trainer, last + "running_mean") and not unchanged(trainer, last + "weight")


# ---- frozen BatchNorm -----------------------------------------------------------------------------------


def test_frozen_batchnorm_statistics_do_not_move_while_the_tower_trains(tmp_path, tokenizer_dir):
    trainer = run(tmp_path, tokenizer_dir, *RESNET, "--model.freeze_batchnorm", "true", steps=2)
    stats = [
        n for n in trainer.before if n.startswith("visual.") and n.endswith(("running_mean", "running_var"))
    ]
    counts = [n for n in trainer.before if n.endswith("num_batches_tracked")]
    assert stats and counts
    assert all(unchanged(trainer, n) for n in stats + counts)
    for name in ("visual.bn1.weight", "visual.layer4.0.bn3.bias", "visual.conv1.weight"):
        assert not unchanged(trainer, name), name  # the gains, biases and convolutions still train
    trainer.model.train()
    norms = [m for m in trainer.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert trainer.model.visual.training and not any(m.training for m in norms)


def test_patch_dropout_trains_with_a_partly_locked_image_tower(tmp_path, tokenizer_dir):
    args = (
        "--model.lock_image",
        "true",
        "--model.lock_image_unlocked_blocks",
        "1",
        "--model.patch_dropout",
        "0.5",
    )
    model = build_model(tiny_config(tmp_path, tokenizer_dir, *NANO, *args), VOCAB).train()
    assert model.visual.patch_dropout.prob == 0.5 and model.visual.patch_dropout.training


def test_the_gradient_cache_trains_a_resnet_whose_batchnorm_is_frozen(tmp_path, tokenizer_dir):
    from clipforge.train.validate import validate_run

    args = (*RESNET, "--model.freeze_batchnorm", "true", "--data.micro_batch_size", "4")
    validate_run(tiny_config(tmp_path / "run", tokenizer_dir, *args))
    trainer = run(tmp_path, tokenizer_dir, *args, steps=1)
    assert trainer.state["step"] == 1 and unchanged(trainer, "visual.bn1.running_mean")


# ---- layer-wise learning-rate decay ----------------------------------------------------------------------


def expected_scales(depth: int, decay: float) -> dict[str, float]:
    blocks = {f"block{i}": decay ** (depth - i) for i in range(1, depth + 1)}
    return {"embeddings": decay**depth, **blocks, "head": 1.0}


@pytest.mark.parametrize("name", ["ViT-Nano-16-64", "RN-Tiny-64"])
def test_layer_decay_scales_every_group_at_every_point_of_the_schedule(tmp_path, tokenizer_dir, name):
    cfg = tiny_config(
        tmp_path, tokenizer_dir, "--model.name", name, "--optim.layer_decay", "0.5",
        "--optim.weight_decay", "0.1", "--schedule.steps", "20", "--schedule.warmup_steps", "5",
    )  # fmt: skip
    model = build_model(cfg, VOCAB)
    optimizer = build_optimizer(cfg, model)
    config = get_config(name)
    layers = config.vision.layers
    depths = {"image": sum(layers) if isinstance(layers, tuple) else layers, "text": config.text.layers}
    scales = {f"{t}.{k}": v for t, d in depths.items() for k, v in expected_scales(d, 0.5).items()}
    scales["logit"] = 1.0
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {n.rsplit(".", 1)[0] for n in groups} == set(scales)
    assert scales["image.embeddings"] == 0.5 ** depths["image"] and scales["text.block1"] == 0.5 ** (
        depths["text"] - 1
    )
    for group_name, group in groups.items():
        layer, kind = group_name.rsplit(".", 1)
        assert group["lr_scale"] == scales[layer]
        assert group["weight_decay"] == (0.1 if kind == "decay" else 0.0)
    schedule = WarmupCosine(cfg.optim.lr, 5, 20, 0.0)
    for step in (0, 3, 5, 11, 19):
        set_lr(optimizer, schedule(step))
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(schedule(step) * scales[group["name"].rsplit(".", 1)[0]])
    counted = sum(len(g["params"]) for g in optimizer.param_groups)
    assert counted == len(list(model.parameters()))


def test_layer_decay_runs_through_the_trainer_with_locked_blocks(tmp_path, tokenizer_dir):
    trainer = run(
        tmp_path, tokenizer_dir, *NANO, "--optim.layer_decay", "0.8",
        "--model.lock_text", "true", "--model.lock_text_unlocked_blocks", "1",
    )  # fmt: skip
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert not any(n.startswith(("text.embeddings", "text.block1.")) for n in groups)  # locked: left out
    last = trainer.schedule(trainer.cfg.schedule.steps - 1)
    assert groups["image.embeddings.decay"]["lr"] == pytest.approx(last * 0.8**2)
    assert groups["image.block1.decay"]["lr"] == pytest.approx(last * 0.8)
    assert groups["text.block2.decay"]["lr"] == pytest.approx(last)
    assert groups["logit.no_decay"]["lr"] == pytest.approx(last)
    assert unchanged(trainer, "transformer.resblocks.0.mlp.c_fc.weight")
    assert not unchanged(trainer, "visual.conv1.weight")


def test_a_resumed_run_keeps_its_layer_decay(tmp_path, tokenizer_dir):
    """The checkpoint's optimizer groups carry their lr scales: a resume may not change them."""
    from clipforge.configs import ConfigError
    from clipforge.train.validate import validate_run

    trainer = run(tmp_path, tokenizer_dir, "--optim.layer_decay", "0.8", steps=2)
    cfg = dataclasses.replace(trainer.cfg, optim=dataclasses.replace(trainer.cfg.optim, layer_decay=0.5))
    with pytest.raises(ConfigError, match=r"^optim\.layer_decay = 0\.5: the checkpoint --resume latest was"):
        validate_run(cfg, "latest")
    resumed = Trainer(trainer.cfg, "latest")  # the same value resumes, lr scales and all
    assert [g["lr_scale"] for g in resumed.optimizer.param_groups] == [
        g["lr_scale"] for g in trainer.optimizer.param_groups
    ]


def test_without_layer_decay_the_two_groups_are_as_before(tmp_path, tokenizer_dir):
    model = build_model(tiny_config(tmp_path, tokenizer_dir), VOCAB)
    optimizer = build_optimizer(tiny_config(tmp_path, tokenizer_dir), model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
    set_lr(optimizer, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3]


# ---- pretrained weights at another image size and context length -----------------------------------------


@pytest.fixture
def pretrained_nano(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A ViT-Nano-16-64 (64 px: a 4 x 4 grid) with the fixture tokenizer's vocabulary and 24 positions."""
    config = get_config("ViT-Nano-16-64")
    config = dataclasses.replace(
        config, text=dataclasses.replace(config.text, vocab_size=VOCAB, context_length=24)
    )
    torch.manual_seed(3)
    model = create_model(config)
    save(model, tmp_path / "nano")
    return tmp_path / "nano", model


def test_pretrained_weights_start_a_larger_image_and_a_shorter_context(
    tmp_path, tokenizer_dir, pretrained_nano
):
    source, saved = pretrained_nano
    args = (
        *NANO,
        "--model.pretrained",
        str(source),
        "--model.image_size",
        "96",
        "--data.context_length",
        "16",
    )
    model = build_model(tiny_config(tmp_path, tokenizer_dir, *args), VOCAB)
    assert model.config.vision.image_size == 96 and model.visual.positional_embedding.shape == (1 + 36, 128)
    assert torch.equal(
        model.visual.positional_embedding, resize_grid_embedding(saved.visual.positional_embedding, 6)
    )
    assert torch.equal(model.positional_embedding, saved.positional_embedding[:16])
    tokens = torch.randint(1, VOCAB - 1, (3, 16))
    tokens[:, -1] = VOCAB - 1  # the end-of-text token, the largest id
    with torch.no_grad():  # the causal mask: the first 16 positions compute what they did
        torch.testing.assert_close(model.encode_text(tokens), saved.encode_text(tokens), rtol=0, atol=0)
    trainer = run(tmp_path, tokenizer_dir, *args, steps=1)
    assert trainer.state["step"] == 1 and trainer.data is not None
    assert not unchanged(trainer, "visual.positional_embedding")
    reloaded = load_model(str(trainer.last_checkpoint))  # the saved model is the new size
    assert reloaded.config.vision.image_size == 96 and reloaded.config.text.context_length == 16


# ---- refused before anything is written ------------------------------------------------------------------


LOCK_IMAGE = ("--model.lock_image", "true")
CASES = {
    "unlocked blocks negative": (
        "model.lock_image_unlocked_blocks", *LOCK_IMAGE, "--model.lock_image_unlocked_blocks", "-1",
    ),
    "unlocked blocks without a lock": (
        "model.lock_text_unlocked_blocks", "--model.lock_text_unlocked_blocks", "1",
    ),
    "more unlocked blocks than the depth": (
        "model.lock_text_unlocked_blocks", "--model.lock_text", "true",
        "--model.lock_text_unlocked_blocks", "2",
    ),
    "more unlocked bottlenecks than a ResNet has": (
        "model.lock_image_unlocked_blocks", "--model.name", "RN50", *LOCK_IMAGE,
        "--model.lock_image_unlocked_blocks", "17",
    ),
    "layer_decay 0": ("optim.layer_decay", "--optim.layer_decay", "0"),
    "layer_decay negative": ("optim.layer_decay", "--optim.layer_decay", "-0.5"),
    "layer_decay above 1": ("optim.layer_decay", "--optim.layer_decay", "1.5"),
    "layer_decay nan": ("optim.layer_decay", "--optim.layer_decay", "nan"),
    "freeze_batchnorm on a ViT": ("model.freeze_batchnorm", "--model.freeze_batchnorm", "true"),
    "image size off the patch grid": ("model.image_size", "--model.image_size", "40"),
    "image size negative": ("model.image_size", "--model.image_size", "-32"),
    "micro-batches with training BatchNorms": (
        "data.micro_batch_size", "--model.name", "RN50", *LOCK_IMAGE,
        "--model.lock_image_unlocked_blocks", "1", "--data.micro_batch_size", "2",
    ),
    "a longer context than the pretrained weights": (
        "data.context_length", "--model.name", "ViT-Nano-16-64", "--model.pretrained", "{nano}",
        "--data.context_length", "32",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_value_is_one_line_exit_2_and_nothing_written(
    name, tmp_path, tokenizer_dir, pretrained_nano, capsys
):
    field, *args = CASES[name]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(MICRO_RECIPE)
    args = [a.replace("{nano}", str(pretrained_nano[0])) for a in args]
    argv = [
        "train",
        str(recipe),
        "--model.tokenizer",
        str(tokenizer_dir),
        "--run.out_dir",
        str(tmp_path / "run"),
    ]
    assert main([*argv, *args]) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith(f"clipforge train: {field} = "), out
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists()


def test_the_new_fields_are_off_by_default():
    from clipforge.train.config import TrainConfig

    cfg = TrainConfig()
    m = cfg.model
    assert (m.lock_image_unlocked_blocks, m.lock_text_unlocked_blocks, m.freeze_batchnorm, m.image_size) == (
        0, 0, False, 0,
    )  # fmt: skip
    assert cfg.optim.layer_decay == 1.0
