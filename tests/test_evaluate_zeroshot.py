import pytest
import torch

from clipforge.evaluate.zeroshot import accuracy_report, build_classifier, fill_template, zeroshot_logits
from clipforge.models import create_model
from conftest import word_tokenizer as stub_tokenizer
from tolerances import rounding_budget, rounding_tolerance


def test_classifier_is_normalized_mean_of_normalized_template_embeddings():
    torch.manual_seed(0)
    model = create_model("ViT-Nano-16-64").eval()
    classes, templates = ["cat", "dog", "red car"], ["a {}", "a photo of a {}.", "{}"]
    weights = build_classifier(model, stub_tokenizer, classes, templates, batch_size=4)
    assert weights.shape == (model.config.embed_dim, 3)
    for c, name in enumerate(classes):  # straightforward recomputation, one class at a time
        with torch.no_grad():
            feats = model.encode_text(stub_tokenizer([t.replace("{}", name) for t in templates]))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(dim=0)
        expected = mean / mean.norm()
        # Other batches through the text tower, two normalizations and a mean (tolerances.rounding_rtol).
        depth, terms = rounding_budget(model.config, "text")
        atol = rounding_tolerance(expected, depth + 3, terms)
        torch.testing.assert_close(weights[:, c], expected, atol=atol, rtol=0)


def test_logits_are_100_times_cosine_and_accuracy_matches_direct_count():
    torch.manual_seed(1)
    model = create_model("ViT-Nano-16-64").eval()
    weights = build_classifier(model, stub_tokenizer, ["a", "b", "c", "d", "e", "f"], ["{}"])
    images = torch.randn(10, 3, 64, 64)
    with torch.no_grad():
        features = model.encode_image(images)
    logits = zeroshot_logits(features, weights)
    cos = torch.stack(
        [torch.stack([torch.cosine_similarity(f, w, dim=0) for w in weights.t()]) for f in features]
    )
    # The same cosines by two formulas: normalizations and a dot product of embed_dim terms, times 100.
    atol = rounding_tolerance(100 * cos, depth=3, terms=model.config.embed_dim)
    torch.testing.assert_close(logits, 100 * cos, atol=atol, rtol=0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    report = accuracy_report(logits, labels, confusion=True)
    ranks = [sorted(range(6), key=lambda j: -logits[i, j].item()).index(labels[i].item()) for i in range(10)]
    assert report.top1 == pytest.approx(sum(r == 0 for r in ranks) / 10)
    assert report.top5 == pytest.approx(sum(r < 5 for r in ranks) / 10)
    assert int(report.confusion.sum()) == 10 and int(report.confusion.diagonal().sum()) == sum(
        r == 0 for r in ranks
    )


def test_mean_per_class_accuracy_weights_classes_equally():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    report = accuracy_report(logits, torch.tensor([0, 0, 0, 1]))
    assert report.top1 == pytest.approx(0.75)
    assert report.mean_per_class == pytest.approx(0.5)
    assert report.per_class == {0: 1.0, 1: 0.0}


def test_template_filling_keeps_braces_in_class_names():
    assert fill_template("a photo of a {}.", "set {x}") == "a photo of a set {x}."
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        fill_template("a photo", "cat")
