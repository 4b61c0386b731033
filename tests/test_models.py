"""The models are CLIP: parameter counts, weight layout and outputs of OpenAI's reference code.

Fixtures in tests/fixtures/models were written by scripts/make_model_fixtures.py running OpenAI's code
(docs/parity.md says how, and why the tolerances are what they are).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipforge.models import CLIPConfig, TextConfig, VisionConfig, available_models, create_model, get_config
from tolerances import rounding_budget, rounding_rtol, rounding_tolerance

FIXTURES = Path(__file__).parent / "fixtures" / "models"

RELEASED_PARAMETER_COUNTS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}

# The small configs of the parity fixtures, in clipforge's terms (see make_model_fixtures.py): several
# heads in every attention (the ViT's 4, the ResNet's attention pool's 4, the text tower's 2).
PARITY_CONFIGS = {
    "vit": CLIPConfig(
        32, VisionConfig("vit", 32, 64, 2, heads=4, patch_size=8), TextConfig(77, 1000, 48, 2, 2)
    ),
    "resnet": CLIPConfig(
        32, VisionConfig("resnet", 64, 8, (1, 2, 1, 1), heads=4), TextConfig(77, 1000, 48, 2, 2)
    ),
}


def meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name)


@pytest.mark.parametrize("name", list(RELEASED_PARAMETER_COUNTS))
def test_parameter_count_equals_released_model(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == RELEASED_PARAMETER_COUNTS[name]


def test_paper_layouts_equal_openai_state_dicts():
    with gzip.open(FIXTURES / "layouts.json.gz", "rt") as f:
        layouts = json.load(f)
    assert set(layouts) == set(RELEASED_PARAMETER_COUNTS)
    for name, expected in layouts.items():
        ours = {k: list(v.shape) for k, v in meta_model(name).state_dict().items()}
        assert ours == expected, name


def test_registry_names_and_aliases():
    names = available_models()
    assert set(RELEASED_PARAMETER_COUNTS) <= set(names)
    assert get_config("ViT-B/32") == get_config("ViT-B-32")
    assert get_config("ViT-L/14@336px") == get_config("ViT-L-14-336")
    with pytest.raises(KeyError, match=r"unknown model 'ViT-X'.*RN50"):
        get_config("ViT-X")


def test_config_round_trips_through_dict():
    for name in available_models():
        config = get_config(name)
        assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bad_configs_are_refused_with_reason():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig("vit", 65, 64, 2, heads=1, patch_size=8)
    with pytest.raises(ValueError, match="4 stage depths"):
        VisionConfig("resnet", 64, 8, (1, 1), heads=1)
    with pytest.raises(ValueError, match="unknown vision kind"):
        VisionConfig("mlp", 64, 8, 1, heads=1)


# Rounding, not bugs (tolerances.rounding_rtol): features may differ by eps * sqrt(terms) * depth of their
# largest magnitude, for their tower's longest chain of products and widest sum: the ResNet fixture's image
# tower, 22 products and 576 terms, allows 6.3e-5; the text towers 2.1e-5. (Measured: below 1e-6, and
# OpenAI's own fp32 outputs are 6e-7 from an fp64 run.) Logits are logit_scale * cos(image, text): each
# feature's relative error moves the cosine by at most its own, so logits may differ by
# (image rtol + text rtol) * logit_scale. A wrong head count moves the outputs by 10% or more
# (test_parity_fixtures_would_catch_a_wrong_head_count).
def parity_rtol(kind: str, tower: str) -> float:
    return rounding_rtol(torch.float32, *rounding_budget(PARITY_CONFIGS[kind], tower))


def parity_outputs(kind: str, config: CLIPConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """clipforge's outputs on a fixture's weights and inputs, and the fixture's (OpenAI's) outputs."""
    fixture = load_file(FIXTURES / f"parity_{kind}.safetensors")
    weights = {k.removeprefix("weights."): v for k, v in fixture.items() if k.startswith("weights.")}
    model = create_model(config).eval()
    model.load_state_dict(weights, strict=True)
    images, tokens = fixture["input.images"], fixture["input.tokens"]
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
        ours = {
            "image_features": model.encode_image(images),
            "text_features": model.encode_text(tokens),
            "logits_per_image": logits_per_image,
            "logits_per_text": logits_per_text,
        }
    reference = {name: fixture[f"output.{name}"] for name in ours}
    reference["logit_scale"] = fixture["weights.logit_scale"].exp()
    return ours, reference


def parity_tolerance(kind: str, name: str, reference: dict[str, torch.Tensor]) -> float:
    image, text = parity_rtol(kind, "image"), parity_rtol(kind, "text")
    if name.startswith("logits"):
        return (image + text) * reference["logit_scale"].item()
    return (image if name == "image_features" else text) * reference[name].abs().max().item()


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_outputs_match_openai_reference_code(kind):
    with safe_open(FIXTURES / f"parity_{kind}.safetensors", "pt") as f:
        made = f.metadata()
    assert int(made["vision_heads"]) == PARITY_CONFIGS[kind].vision.heads > 1
    ours, reference = parity_outputs(kind, PARITY_CONFIGS[kind])
    for name, value in ours.items():
        atol = parity_tolerance(kind, name, reference)
        torch.testing.assert_close(value, reference[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_parity_fixtures_would_catch_a_wrong_head_count(kind):
    # The fixtures' attention is far from uniform (make_model_fixtures.py's QK_GAIN): with 1 head instead of
    # 4 the image features and logits move by far more than the tolerance, so multi-head attention is tested.
    config = PARITY_CONFIGS[kind]
    wrong = dataclasses.replace(config, vision=dataclasses.replace(config.vision, heads=1))
    ours, reference = parity_outputs(kind, wrong)
    for name in ("image_features", "logits_per_image"):
        error = (ours[name] - reference[name]).abs().max().item()
        assert error > 100 * parity_tolerance(kind, name, reference), name


def test_initialization_follows_the_paper():
    torch.manual_seed(0)
    model = create_model("ViT-Nano-16-64")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.1)
    width, layers = model.config.text.width, model.config.text.layers
    block = model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(width**-0.5, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(width**-0.5 * (2 * layers) ** -0.5, rel=0.05)
    assert torch.count_nonzero(block.attn.in_proj_bias) == 0
    resnet = create_model("RN-Tiny-64")
    assert all(
        torch.count_nonzero(stage[0].bn3.weight) == 0
        for stage in (resnet.visual.layer1, resnet.visual.layer4)
    )


def test_text_pools_at_eot_and_ignores_what_follows():
    torch.manual_seed(0)
    model = create_model("ViT-Nano-16-64").eval()
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, :4] = torch.tensor([49406, 320, 1929, 49407])
    tokens[1, 10:20] = 5  # junk after EOT must not matter: attention is causal
    with torch.no_grad():
        a, b = model.encode_text(tokens)
        short = model.encode_text(tokens[:1, :4])  # a shorter context gives the same features
    # Other rows and another sequence length: the same function, up to rounding (tolerances.rounding_rtol).
    atol = rounding_tolerance(a, *rounding_budget(model.config, "text"))
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    torch.testing.assert_close(short[0], a, atol=atol, rtol=0)


def test_too_long_text_is_refused():
    model = create_model("ViT-Nano-16-64")
    with pytest.raises(ValueError, match=r"78 tokens.*context length is 77"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("name", ["ViT-Nano-16-64", "RN-Tiny-64"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (2, 12))
    tokens[:, -1] = 49407

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        logits, _ = model(images, tokens)
        logits.logsumexp(dim=1).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.set_grad_checkpointing(True)
    # The recomputed forward repeats the same operations on the same shapes: torch's float32 defaults
    # (1.3e-6 relative, about 11 eps) cover a reduction that sums in another order.
    for g0, g1 in zip(plain, grads(), strict=True):
        torch.testing.assert_close(g0, g1)


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("ViT-Nano-16-64").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.encode_image(images)
    # Autocast rounds each product's operands to bfloat16 (unit roundoff u = 2^-8) and sums in float32: a
    # product moves by about 2u, a chain of `depth` of them by at most 2u * depth (0.11 here) of the
    # features' norm, which keeps the cosine above sqrt(1 - 0.11^2) = 0.994. (Measured: 0.007 of the norm.)
    depth, _ = rounding_budget(model.config, "image")
    drift = 2 * 2**-8 * depth
    assert torch.nn.functional.cosine_similarity(full, half.float()).min() > math.sqrt(1 - drift**2)


def test_logit_bias_exists_only_when_configured():
    plain = create_model("ViT-Nano-16-64")
    assert plain.logit_bias is None and "logit_bias" not in plain.state_dict()
    config = dataclasses.replace(get_config("ViT-Nano-16-64"), logit_bias=True)
    torch.manual_seed(0)
    model = create_model(config).eval()
    assert set(model.state_dict()) == {*plain.state_dict(), "logit_bias"}  # OpenAI's keys plus one
    assert model.logit_bias.item() == -10.0  # SigLIP's initial bias
    assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (3, 8))
    with torch.no_grad():
        logits, per_text = model(images, tokens)
        model.logit_bias.zero_()
        unbiased, _ = model(images, tokens)
    # One float32 subtraction apart: at most one rounding of |logit| + 10.
    atol = torch.finfo(torch.float32).eps * (unbiased.abs().max().item() + 10)
    torch.testing.assert_close(logits, unbiased - 10.0, atol=atol, rtol=0)
    assert torch.equal(per_text, logits.t())


def test_towers_partition_the_parameters():
    model = create_model("RN-Tiny-64")
    image, text = model.tower_parameters("image"), model.tower_parameters("text")
    ids = [id(p) for p in image + text]
    assert len(ids) == len(set(ids))
    rest = {n for n, p in model.named_parameters() if id(p) not in set(ids)}
    assert rest == {"logit_scale"}
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        model.tower_parameters("audio")


def test_locked_tower_has_no_gradients_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = create_model("RN-Tiny-64")
    model.lock_tower("image")
    assert model.locked_towers == {"image"}
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.tower_parameters("text"))
    model.train()
    assert model.training and model.transformer.training and not model.visual.training
    assert not any(m.training for m in model.visual.modules())
    bn = model.visual.bn1
    before = bn.running_mean.clone()
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (2, 8))
    logits, _ = model(images, tokens)
    logits.logsumexp(dim=1).sum().backward()
    assert torch.equal(bn.running_mean, before)  # eval mode: BatchNorm statistics do not move
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.text_projection.grad is not None
    model.eval().train()
    assert not model.visual.training  # still locked after another round trip
