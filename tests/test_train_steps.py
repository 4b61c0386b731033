"""Step strategies: the gradient cache takes the plain step's update (loss, gradients, parameters) a
micro-batch at a time, for both losses, with clipping, patch dropout and non-finite losses, and through a
`clipforge train` run.

Tolerances: the two strategies compute the same sums in a different order (per micro-batch instead of per
batch, in the encoders' forward and backward), so they differ by rounding alone. `rounding_rtol` bounds
that from the dtype's eps, the fan-in and the depth: forward and backward make the chain twice as long,
and a weight gradient sums over every token of the batch. (No float64 variant: the model's LayerNorms
compute in fp32 whatever the input's dtype, so a float64 model rounds like an fp32 one.)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from clipforge.checkpoints.native import WEIGHTS_FILE
from clipforge.cli import main
from clipforge.configs import ConfigError, dump_toml
from clipforge.data.config import DataConfig
from clipforge.models import create_model
from clipforge.train import loss as loss_module
from clipforge.train import steps as steps_module
from clipforge.train.checkpointing import list_checkpoints
from clipforge.train.loop import build_model, build_optimizer, train
from clipforge.train.loss import BatchLoss
from clipforge.train.steps import StepParts, gradient_cache_step, train_step
from conftest import tiny_config
from tolerances import rounding_budget, rounding_rtol

BATCH, CONTEXT, VOCAB = 16, 16, 600
LR = 1e-4


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, 32, 32, generator=g)
    tokens = torch.randint(1, VOCAB - 1, (BATCH, CONTEXT), generator=g)
    tokens[:, -1] = VOCAB - 1  # the end token, which the text tower reads its features from
    return images, tokens


def two_copies(tmp_path, tokenizer_dir, *extra: str):
    """Two identical (model, optimizer) pairs of the tiny ViT the trainer builds."""
    cfg = tiny_config(tmp_path, tokenizer_dir, *extra)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    twin = copy.deepcopy(model)
    return cfg, [(m, build_optimizer(cfg, m)) for m in (model, twin)]


def parts(model, optimizer, grad_clip: float = 0.0, loss: str = "contrastive") -> StepParts:
    return StepParts.single(model, optimizer, "fp32", loss=BatchLoss(loss), grad_clip=grad_clip)


def record_gradients(model, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The gradients the optimizer is about to apply, by parameter name, captured just before its step
    (both steps zero them afterwards)."""
    grads: dict[str, torch.Tensor] = {}

    def keep(*_):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    optimizer.register_step_pre_hook(keep)
    return grads


def tolerance(model) -> float:
    """Relative (to a tensor's largest magnitude) rounding bound of a gradient of the tiny model."""
    depth, terms = max(rounding_budget(model.config, t) for t in ("image", "text"))
    return rounding_rtol(torch.float32, 2 * depth, max(terms, BATCH * CONTEXT))


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = max(a.abs().max().item(), b.abs().max().item(), torch.finfo(a.dtype).tiny)
    diff = (a - b).abs().max().item()
    assert diff <= rtol * scale, f"{what}: max diff {diff:.3g} > {rtol:.3g} x {scale:.3g}"


def run_both(pairs, micro: int, *args):
    images, tokens = batch()
    (plain, plain_opt), (cached, cached_opt) = pairs
    plain_grads = record_gradients(plain, plain_opt)
    cached_grads = record_gradients(cached, cached_opt)
    a = train_step(parts(plain, plain_opt, *args), images, tokens, LR)
    b = gradient_cache_step(parts(cached, cached_opt, *args), images, tokens, LR, micro)
    return a, b, plain_grads, cached_grads


@pytest.mark.parametrize("loss", ["contrastive", "sigmoid"])
@pytest.mark.parametrize("micro", [BATCH // 4, BATCH])
def test_gradient_cache_equals_the_plain_step(tmp_path, tokenizer_dir, loss, micro):
    _, pairs = two_copies(tmp_path, tokenizer_dir, "--loss.name", loss)
    (plain, plain_opt), (cached, _) = pairs
    a, b, plain_grads, cached_grads = run_both(pairs, micro, 0.0, loss)
    rtol = tolerance(plain)
    assert a.finite and b.finite
    assert b.loss == pytest.approx(a.loss, rel=rtol)
    assert b.grad_norm == pytest.approx(a.grad_norm, rel=rtol)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) == len(list(plain.parameters()))
    for key, grad in plain_grads.items():
        assert_close(cached_grads[key], grad, rtol, f"gradient of {key}")
    # AdamW's first update is lr * g / (|g| + eps): a gradient error moves it by at most lr / eps times it.
    eps = plain_opt.param_groups[0]["eps"]
    for (name, p), q in zip(plain.named_parameters(), cached.parameters(), strict=True):
        bound = LR / eps * rtol * plain_grads[name].abs().max().item()
        assert (p - q).abs().max().item() <= max(bound, 1e-5 * LR), name
    if loss == "sigmoid":
        assert plain.logit_bias is not None and cached.logit_bias.item() == pytest.approx(
            plain.logit_bias.item(), abs=LR * rtol
        )


def test_gradient_cache_clips_like_the_plain_step(tmp_path, tokenizer_dir):
    _, pairs = two_copies(tmp_path, tokenizer_dir)
    a, b, plain_grads, cached_grads = run_both(pairs, BATCH // 4, 1e-3, "contrastive")
    rtol = tolerance(pairs[0][0])
    assert a.grad_norm > 1e-3 and b.grad_norm == pytest.approx(a.grad_norm, rel=rtol)  # clipping happened
    norm = math.sqrt(sum(g.square().sum().item() for g in cached_grads.values()))
    assert norm == pytest.approx(1e-3, rel=1e-3)  # the clipped gradient is what the optimizer applied
    for key, grad in plain_grads.items():
        assert_close(cached_grads[key], grad, rtol, f"clipped gradient of {key}")


def test_both_passes_see_the_same_patches(tmp_path, tokenizer_dir):
    """With patch dropout the cache cannot match the plain step (its draws are per micro-batch), but it must
    match the same micro-batch draws backpropagated directly, and leave the RNG where those draws did."""
    _, [(model, optimizer), (reference, _)] = two_copies(
        tmp_path, tokenizer_dir, "--model.patch_dropout", "0.5"
    )
    images, tokens = batch()
    micro = BATCH // 4
    grads = record_gradients(model, optimizer)
    torch.manual_seed(7)
    gradient_cache_step(parts(model, optimizer), images, tokens, LR, micro)
    after_cache = torch.get_rng_state()

    torch.manual_seed(7)
    pieces = zip(images.split(micro), tokens.split(micro), strict=True)
    features = [steps_module.encode(reference, i, t, "fp32") for i, t in pieces]
    image_features = torch.cat([i for i, _ in features])
    text_features = torch.cat([t for _, t in features])
    loss_module.contrastive_loss(image_features, text_features, reference.logit_scale).backward()
    assert torch.equal(torch.get_rng_state(), after_cache)
    rtol = tolerance(model)
    for name, p in reference.named_parameters():
        assert_close(grads[name], p.grad, rtol, f"gradient of {name}")


def test_a_non_finite_loss_skips_the_update_as_the_plain_step_does(tmp_path, tokenizer_dir, monkeypatch):
    _, pairs = two_copies(tmp_path, tokenizer_dir)
    before = [p.detach().clone() for p in pairs[0][0].parameters()]
    real = loss_module.contrastive_loss
    monkeypatch.setattr(loss_module, "contrastive_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    a, b, _, _ = run_both(pairs, BATCH // 4, 0.0, "contrastive")
    assert a.non_finite == b.non_finite == "loss"
    assert math.isnan(b.loss) and math.isnan(b.grad_norm)
    for model, optimizer in pairs:
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert all(p.grad is None for p in model.parameters())
        assert not optimizer.state  # no moment was started


def test_a_training_batchnorm_is_refused():
    model = create_model("RN-Tiny-64").train()
    optimizer = torch.optim.AdamW(model.parameters())
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(1, 100, (4, 8))
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        gradient_cache_step(parts(model, optimizer), images, tokens, LR, 2)


def test_a_locked_resnet_tower_is_exact():
    """A locked tower runs in eval mode: its BatchNorms use running statistics, per sample, so the cache
    is allowed and exact (the text tower trains)."""
    torch.manual_seed(0)
    model = create_model("RN-Tiny-64")
    model.lock_tower("image")
    model.train()
    twin = copy.deepcopy(model)
    images, tokens = torch.randn(8, 3, 64, 64), torch.randint(1, 100, (8, 8))
    tokens[:, -1] = 100
    pairs = [
        (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)) for m in (model, twin)
    ]
    plain_grads, cached_grads = (record_gradients(m, o) for m, o in pairs)
    a = train_step(parts(*pairs[0]), images, tokens, LR)
    b = gradient_cache_step(parts(*pairs[1]), images, tokens, LR, 2)
    rtol = tolerance(model)
    assert b.loss == pytest.approx(a.loss, rel=rtol)
    assert plain_grads and plain_grads.keys() == cached_grads.keys()
    assert not any(name.startswith("visual.") for name in plain_grads)
    for key, grad in plain_grads.items():
        assert_close(cached_grads[key], grad, rtol, f"gradient of {key}")


@pytest.mark.parametrize(
    ("micro", "ok"), [(0, True), (8, True), (32, True), (5, False), (64, False), (-1, False)]
)
def test_micro_batch_size_is_zero_or_a_divisor_of_the_batch(micro, ok):
    cfg = DataConfig(batch_size=32, micro_batch_size=micro)
    if ok:
        cfg.validate()
    else:
        with pytest.raises(ConfigError, match=rf"^data\.micro_batch_size = {micro}: must be"):
            cfg.validate()


def test_a_resnet_in_training_is_refused_before_the_run(tmp_path, tokenizer_dir):
    cfg = tiny_config(
        tmp_path / "run", tokenizer_dir, "--model.name", "RN-Tiny-64", "--data.micro_batch_size", "8"
    )
    with pytest.raises(
        ConfigError, match=r"^data\.micro_batch_size = 8: needs a ViT image tower, model\.lock_image "
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_with_the_gradient_cache_ends_where_the_plain_run_does(tmp_path, tokenizer_dir, capsys):
    """`clipforge train`, 3 steps of 32 with micro-batches of 8 against the whole batch at once.

    Adam divides by sqrt(v) + eps, so with the ViT's eps of 1e-6 a rounding difference in a gradient element
    near zero moves its update by up to lr / 1e-6 times that difference: a bound no CPU-independent
    tolerance survives. With eps = 1e-3 the amplification is at most lr / eps = 0.5, so the gradients'
    rounding differences (far below 1e-6 here) keep the parameters within 1e-5 after 3 steps on any CPU."""

    def run(name: str, *extra: str) -> dict[str, torch.Tensor]:
        recipe = tmp_path / f"{name}.toml"
        cfg = tiny_config(tmp_path / name, tokenizer_dir, "--schedule.steps", "3", "--optim.eps", "1e-3")
        recipe.write_text(dump_toml(cfg))
        code = main(["train", str(recipe), *extra])
        assert code == 0, capsys.readouterr().out
        return load_file(list_checkpoints(tmp_path / name)[-1] / WEIGHTS_FILE)

    plain, cached = run("plain"), run("cached", "--data.micro_batch_size", "8")
    assert plain.keys() == cached.keys()
    for key in plain:
        assert (plain[key] - cached[key]).abs().max().item() <= 1e-5, key
