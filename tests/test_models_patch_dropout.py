"""Patch dropout (FLIP): fewer patch tokens in training, all of them in eval, the class token always."""

from __future__ import annotations

import pytest
import torch

from clipforge.models import create_model
from clipforge.models.patch_dropout import PatchDropout


def tokens(batch: int = 3, patches: int = 16, width: int = 4) -> torch.Tensor:
    # Token k of image b holds the value 1000 * b + k in every channel, so the survivors can be read off.
    ids = torch.arange(1 + patches, dtype=torch.float32) + 1000 * torch.arange(batch)[:, None]
    return ids[..., None].expand(-1, -1, width).clone()


@pytest.mark.parametrize(("prob", "kept"), [(0.5, 8), (0.75, 4), (0.3, 11), (0.99, 1)])
def test_keeps_the_class_token_and_a_random_subset_of_patches(prob, kept):
    drop = PatchDropout(prob).train()
    x = tokens()
    y = drop(x)
    assert y.shape == (3, 1 + kept, 4) and drop.kept(16) == kept
    for b in range(3):
        ids = y[b, :, 0] - 1000 * b
        assert ids[0] == 0  # the class token, first
        survivors = ids[1:].long().tolist()
        assert len(set(survivors)) == kept and all(1 <= k <= 16 for k in survivors)  # distinct patches
        assert torch.equal(y[b, :, 1], y[b, :, 0])  # whole tokens are moved, not mixed
    assert not torch.equal(y[0, 1:, 0], y[1, 1:, 0] - 1000)  # each image draws its own subset


def test_eval_mode_and_zero_probability_change_nothing():
    x = tokens()
    assert torch.equal(PatchDropout(0.5).eval()(x), x)
    assert torch.equal(PatchDropout(0.0).train()(x), x)


def test_the_same_seed_drops_the_same_patches():
    drop, x = PatchDropout(0.5).train(), tokens()
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_probability_outside_zero_to_one_is_refused():
    for prob in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"patch dropout must be in \[0, 1\)"):
            PatchDropout(prob)


def test_vit_trains_on_fewer_tokens_and_evaluates_on_all():
    torch.manual_seed(0)
    model = create_model("ViT-Nano-16-64")  # 4 x 4 = 16 patches
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.eval().encode_image(images)
    model.set_patch_dropout(0.5)
    seen = []
    hook = model.visual.transformer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    model.train()
    features = model.encode_image(images)
    assert seen[-1] == (2, 1 + 8, 128)  # class token + half the patches
    features.sum().backward()  # gradients still reach the patch embedding and the positions
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.visual.positional_embedding.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference)
    assert seen[-1] == (2, 1 + 16, 128)
    hook.remove()


def test_resnet_refuses_patch_dropout():
    model = create_model("RN-Tiny-64")
    model.set_patch_dropout(0.0)  # off is fine
    with pytest.raises(ValueError, match=r"patch dropout needs a ViT image tower.*ModifiedResNet"):
        model.set_patch_dropout(0.5)
