"""OpenAI-layout files: TorchScript archives without torch.jit.load, state dicts, architecture inference."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from clipforge.checkpoints import CheckpointError, infer_config, load_model, read_weights
from clipforge.models import create_model
from clipforge.models.config import MODEL_CONFIGS, PAPER_MODELS

TINY = ["ViT-Nano-16-64", "RN-Tiny-64"]
EXTRAS = {
    "input_resolution": torch.tensor(64),
    "context_length": torch.tensor(77),
    "vocab_size": torch.tensor(49408),
}


def _tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name).eval()


def _inputs(model, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    tokens = torch.randint(1, 1000, (2, 12), generator=g)
    tokens[:, -1] = model.config.text.vocab_size - 1  # end-of-text: the largest id
    return images, tokens


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _forbid_torch_loaders(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must not call torch.load / torch.jit.load")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.parametrize("name", TINY)
def test_torchscript_archive_loads_without_jit_load(tmp_path, monkeypatch, name):
    model = _tiny(name)
    images, tokens = _inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow
        traced = torch.jit.trace(model, (images, tokens), check_trace=False)
        path = tmp_path / f"{name}.pt"
        torch.jit.save(traced, path)

    _forbid_torch_loaders(monkeypatch)
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    _assert_same_state(model, loaded)
    with torch.no_grad():
        for got, want in zip(loaded(images, tokens), model(images, tokens), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", TINY)
def test_fp16_state_dict_with_extras_infers_config(tmp_path, name):
    model = _tiny(name)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = tmp_path / "weights.pt"
    torch.save({**sd, **EXTRAS}, path)

    loaded = load_model(path)
    assert loaded.config == MODEL_CONFIGS[name]
    for key, value in loaded.state_dict().items():
        assert value.dtype == model.state_dict()[key].dtype  # fp16 became fp32
        assert torch.equal(value, sd[key].to(value.dtype)), key


@pytest.mark.parametrize("name", [*PAPER_MODELS, *(n for n in MODEL_CONFIGS if n not in PAPER_MODELS)])
def test_inference_from_shapes_returns_the_registered_config(name):
    with torch.device("meta"):
        sd = create_model(name).state_dict()
    # Shapes cannot tell the activation: inference assumes OpenAI's QuickGELU (OpenCLIP's GELU models too).
    want = dataclasses.replace(MODEL_CONFIGS[name], activation="quick_gelu")
    assert infer_config(sd) == want
    assert infer_config({**sd, **EXTRAS}) == want


def test_inference_of_an_unregistered_shape():
    config = dataclasses.replace(MODEL_CONFIGS["ViT-Nano-16-64"], embed_dim=96)
    with torch.device("meta"):
        sd = create_model(config).state_dict()
    assert infer_config(sd) == config


def test_wrapped_and_prefixed_state_dicts(tmp_path):
    model = _tiny("ViT-Nano-16-64")
    for i, obj in enumerate(
        [
            {"state_dict": model.state_dict(), "epoch": 3},
            {"model": {f"module.{k}": v for k, v in model.state_dict().items()}},
        ]
    ):
        torch.save(obj, tmp_path / f"{i}.pt")
        _assert_same_state(model, load_model(tmp_path / f"{i}.pt"))


def test_architecture_by_name_weights_from_file(tmp_path):
    model = _tiny("RN-Tiny-64")
    torch.save(model.state_dict(), tmp_path / "rn.pt")
    _assert_same_state(model, load_model("RN-Tiny-64", pretrained=tmp_path / "rn.pt"))
    with pytest.raises(CheckpointError, match=r"missing: .*visual\.class_embedding") as err:
        load_model("ViT-Nano-16-64", pretrained=tmp_path / "rn.pt")
    assert "unexpected: visual.bn1.weight" in str(err.value)
    assert "visual.conv1.weight (8, 3, 3, 3) (model: (128, 3, 16, 16))" in str(err.value)


def test_errors_name_missing_unexpected_and_misshapen_keys(tmp_path):
    sd = _tiny("ViT-Nano-16-64").state_dict()
    del sd["ln_final.bias"]
    sd["visual.mystery"] = torch.zeros(1)
    sd["logit_scale"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pt")
    message = str(err.value)
    assert "missing: ln_final.bias" in message
    assert "unexpected: visual.mystery" in message
    assert "wrong shape: logit_scale (2,) (model: ())" in message
    assert str(tmp_path / "bad.pt") in message


def test_inference_names_the_key_it_lacks(tmp_path):
    sd = _tiny("ViT-Nano-16-64").state_dict()
    del sd["token_embedding.weight"]
    torch.save(sd, tmp_path / "no_vocab.pt")
    with pytest.raises(CheckpointError, match=r"token_embedding\.weight"):
        load_model(tmp_path / "no_vocab.pt")


def test_script_tree_tolerates_extra_tensor_attributes(tmp_path):
    class Wrapped(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.inner = clip
            for key, value in EXTRAS.items():
                self.register_buffer(key, value)

        def forward(self, images, tokens):
            return self.inner(images, tokens)

    model = _tiny("ViT-Nano-16-64")
    model.visual.register_buffer("cached_mask", torch.ones(3))  # not part of the architecture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, _inputs(model), check_trace=False)
        torch.jit.save(traced, tmp_path / "m.pt")
    weights = read_weights(tmp_path / "m.pt")
    assert weights.from_script and "visual.cached_mask" in weights.state_dict
    loaded = load_model(tmp_path / "m.pt")
    assert "visual.cached_mask" not in loaded.state_dict()


def test_legacy_torch_save_format(tmp_path):
    model = _tiny("RN-Tiny-64")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _assert_same_state(model, load_model(tmp_path / "legacy.pt"))


def test_weights_of_something_else_are_refused_clearly(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(CheckpointError, match="not CLIP weights"):
        load_model(tmp_path / "linear.pt")
