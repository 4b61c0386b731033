"""Image features: the pre-projection hooks of both towers, and dataset order with decode workers."""

import torch

from clipforge.evaluate.datasets import DataSpec, read_labelled
from clipforge.evaluate.features import capture_pre_projection, image_encoder, image_features
from clipforge.models import create_model
from sample_files import labelled_samples, write_shard
from tolerances import rounding_tolerance


def test_vit_pre_projection_features_are_the_embedding_before_proj():
    torch.manual_seed(0)
    model = create_model("ViT-Micro-16-32").eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pre = image_encoder(model, "pre-projection")(images)
        embed = image_encoder(model, "embed")(images)
    assert pre.shape == (3, model.config.vision.width)
    # One product of `width` terms, maybe summed in another order (tolerances.rounding_rtol).
    atol = rounding_tolerance(embed, depth=1, terms=model.config.vision.width)
    torch.testing.assert_close(pre @ model.visual.proj, embed, atol=atol, rtol=0)


def test_resnet_pre_projection_features_are_the_attention_pool_before_c_proj():
    torch.manual_seed(0)
    model = create_model("RN-Tiny-64").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre = image_encoder(model, "pre-projection")(images)
        embed = model.encode_image(images)
        atol = rounding_tolerance(embed, depth=1, terms=pre.shape[1])  # one product, as above
        torch.testing.assert_close(model.visual.attnpool.c_proj(pre), embed, atol=atol, rtol=0)
    with capture_pre_projection(model.visual):
        pass
    assert not model.visual.attnpool.c_proj._forward_pre_hooks  # the hook is gone afterwards


def test_features_keep_dataset_order_with_decode_workers(tmp_path):
    torch.manual_seed(0)
    model = create_model("ViT-Micro-16-32").eval()
    write_shard(tmp_path / "eval.tar", labelled_samples(["red", "green", "blue"] * 3))
    data = read_labelled(DataSpec(str(tmp_path / "eval.tar")))
    inline = image_features(model, data.images, batch_size=2, workers=0)
    parallel = image_features(model, data.images, batch_size=2, workers=2)
    assert inline.shape == (9, model.config.embed_dim) and torch.equal(inline, parallel)
    assert not torch.equal(inline[0], inline[1])
