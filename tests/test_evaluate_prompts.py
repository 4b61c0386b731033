"""Built-in and file prompt sets, template loading, and classifiers for classes with several names."""

import json
from importlib import resources

import pytest
import torch

from clipforge.evaluate.prompts import available_prompts, load_prompts, load_templates
from clipforge.evaluate.zeroshot import build_classifier, build_classifier_for_names
from clipforge.models import create_model
from conftest import word_tokenizer as stub_tokenizer
from tolerances import rounding_budget, rounding_tolerance


def test_builtin_sets_are_openais_published_prompts():
    names = available_prompts()
    assert len(names) == 27 and {"imagenet", "cifar10", "kinetics700", "sun397", "stanfordcars"} <= set(names)
    imagenet = load_prompts("imagenet")
    assert len(imagenet.classes) == 1000 and len(imagenet.templates) == 80
    assert imagenet.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert imagenet.templates[0] == "a bad photo of a {}." and imagenet.classnames[-1] == "toilet paper"
    sizes = {
        n: len(load_prompts(n).classes) for n in ("cifar100", "kinetics700", "sun397", "birdsnap", "gtsrb")
    }
    assert sizes == {"cifar100": 100, "kinetics700": 700, "sun397": 397, "birdsnap": 500, "gtsrb": 43}
    fer = load_prompts("FacialEmotionRecognition2013")
    assert fer.classes[3] == ("happy", "smiling") and fer.classnames[3] == "happy"
    assert all("{}" in t for n in names for t in load_prompts(n).templates)


def test_builtin_sets_ship_as_package_data_with_their_attribution():
    folder = resources.files("clipforge.evaluate") / "prompts"
    assert "MIT" in (folder / "README.txt").read_text(encoding="utf-8")
    assert (folder / "cifar10.json").is_file()


def test_prompt_files_hold_a_list_a_dict_or_classes_and_templates(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "dict.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    (tmp_path / "full.json").write_text(
        json.dumps({"classes": ["cat", ["dog", "puppy"]], "templates": ["a {}"]})
    )
    assert load_prompts(tmp_path / "list.json").classnames == ["cat", "dog"]
    assert load_prompts(tmp_path / "dict.json").templates == ()
    full = load_prompts(tmp_path / "full.json")
    assert full.classes == (("cat",), ("dog", "puppy")) and full.templates == ("a {}",)
    (tmp_path / "bad.json").write_text(json.dumps({"classes": ["cat"], "templates": ["no slot"]}))
    with pytest.raises(ValueError, match="needs"):
        load_prompts(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_prompts("no-such-set")


def test_templates_from_files_builtins_and_literals(tmp_path):
    (tmp_path / "t.txt").write_text("a {}\n\nthe {}\n")
    assert load_templates(tmp_path / "t.txt") == ["a {}", "the {}"]
    assert load_templates("identity") == ["{}"] and load_templates("a-photo-of") == ["a photo of a {}."]
    assert len(load_templates("imagenet")) == 80 and len(load_templates("cifar10")) == 18
    assert load_templates("an emoji of {}") == ["an emoji of {}"]
    with pytest.raises(FileNotFoundError):
        load_templates("no template here")


def test_classifier_for_names_averages_every_name_and_template():
    torch.manual_seed(0)
    model = create_model("ViT-Micro-16-32").eval()
    templates = ["a {}", "the {}."]
    single = build_classifier_for_names(model, stub_tokenizer, [["cat"], ["dog"]], templates)
    assert torch.equal(single, build_classifier(model, stub_tokenizer, ["cat", "dog"], templates))
    weights = build_classifier_for_names(
        model, stub_tokenizer, [["cat"], ["dog", "puppy", "hound"]], templates
    )
    with torch.no_grad():
        feats = model.encode_text(
            stub_tokenizer([t.replace("{}", n) for n in ("dog", "puppy", "hound") for t in templates])
        )
    mean = (feats / feats.norm(dim=-1, keepdim=True)).mean(dim=0)
    expected = mean / mean.norm()
    # Other batches through the text tower, then two normalizations and a mean (tolerances.rounding_rtol).
    depth, terms = rounding_budget(model.config, "text")
    atol = rounding_tolerance(expected, depth + 3, terms)
    torch.testing.assert_close(weights[:, 1], expected, atol=atol, rtol=0)
    torch.testing.assert_close(weights[:, 0], single[:, 0], atol=atol, rtol=0)
