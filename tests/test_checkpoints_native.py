"""clipforge directories (config.json + model.safetensors): exact round trips, atomic saves; .safetensors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipforge.checkpoints import CheckpointError, load, load_model, read_weights, save
from clipforge.checkpoints import native as native_module
from clipforge.models import create_model
from clipforge.models.config import MODEL_CONFIGS
from clipforge.tokenizer import train_tokenizer


def _trained(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose BatchNorm statistics moved (so every buffer is non-default)."""
    torch.manual_seed(seed)
    model = create_model(name)
    if model.config.vision.kind == "resnet":
        with torch.no_grad():
            model.encode_image(torch.randn(2, 3, 64, 64))
    return model.eval()


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", ["ViT-Nano-16-64", "RN-Tiny-64"])
def test_round_trip_is_exact(tmp_path, name):
    model = _trained(name)
    out = save(model, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "clipforge" and meta["format_version"] == 1 and meta["tokenizer"] is None
    loaded = load_model(out)
    assert loaded.config == model.config == MODEL_CONFIGS[name] and not loaded.training
    _assert_identical(model, loaded)


def test_config_from_the_directory_wins_over_inference(tmp_path):
    # Head counts cannot be read from shapes: the directory's config keeps them.
    config = MODEL_CONFIGS["ViT-Nano-16-64"]
    odd = type(config)(config.embed_dim, config.vision, type(config.text)(width=128, heads=4, layers=2))
    model = create_model(odd).eval()
    loaded = load_model(save(model, tmp_path / "odd"))
    assert loaded.config.text.heads == 4
    _assert_identical(model, loaded)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_model("ViT-Nano-16-64", pretrained=tmp_path / "odd")


def test_save_replaces_an_earlier_save_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "model"
    save(_trained("ViT-Nano-16-64", seed=0), target)
    second = _trained("ViT-Nano-16-64", seed=1)
    save(second, target)
    _assert_identical(second, load_model(target))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_save_leaves_the_old_save_intact(tmp_path, monkeypatch):
    target = tmp_path / "model"
    first = _trained("ViT-Nano-16-64", seed=0)
    save(first, target)

    def half_write(tensors, path, metadata=None):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(native_module, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save(_trained("ViT-Nano-16-64", seed=1), target)
    with pytest.raises(OSError):
        save(first, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs, no half-written "fresh"
    monkeypatch.undo()
    _assert_identical(first, load_model(target))


def test_save_refuses_to_clobber_other_things(tmp_path):
    model = _trained("ViT-Nano-16-64")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for target in (tmp_path / "notes", tmp_path / "file"):
        with pytest.raises(CheckpointError, match="cannot save"):
            save(model, target)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    save(model, tmp_path / "empty")  # an empty directory is fine


def test_load_returns_model_preprocess_and_the_saved_tokenizer(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a cat\na photo of a dog\na drawing of a cat\n" * 20)
    tokenizer = train_tokenizer([captions], vocab_size=600)
    model = _trained("ViT-Nano-16-64")
    out = save(model, tmp_path / "with_tok", tokenizer=tokenizer)
    assert json.loads((out / "config.json").read_text())["tokenizer"] == {"path": "tokenizer"}

    loaded, preprocess, tok = load(out, device="cpu")
    _assert_identical(model, loaded)
    assert torch.equal(tok(["a photo of a cat"]), tokenizer(["a photo of a cat"]))
    assert tok.vocab_size == tokenizer.vocab_size
    pixels = preprocess(Image.new("RGB", (80, 100), (120, 30, 200)))
    assert pixels.shape == (3, 64, 64)


def test_safetensors_file_alone_infers_the_architecture(tmp_path):
    model = _trained("RN-Tiny-64")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors")
    assert loaded.config == MODEL_CONFIGS["RN-Tiny-64"]
    _assert_identical(model, loaded)
    # model.safetensors inside a clipforge directory uses the directory's config.json
    out = save(model, tmp_path / "dir")
    assert read_weights(out / "model.safetensors").config == model.config


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a clipforge config"):
        load_model(tmp_path / "d")


def test_corrupt_files_in_a_directory_are_reported(tmp_path):
    out = save(_trained("ViT-Nano-16-64"), tmp_path / "m")
    (out / "model.safetensors").write_bytes((100).to_bytes(8, "little") + b"{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(out)
    (out / "config.json").write_text('{"format": "clipforge", "format_version": 1, "model": {"vision": {}}}')
    with pytest.raises(CheckpointError, match=r"config\.json field 'model\.embed_dim' is missing"):
        load_model(out)


def test_logit_bias_round_trips_through_directories_and_bare_files(tmp_path):
    torch.manual_seed(0)
    config = dataclasses.replace(MODEL_CONFIGS["ViT-Nano-16-64"], logit_bias=True)
    model = create_model(config).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-3.25)
    loaded = load_model(save(model, tmp_path / "siglip"))
    assert loaded.config.logit_bias and loaded.logit_bias.item() == -3.25
    _assert_identical(model, loaded)
    # A bare weights file says it has a bias by having the key.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    inferred = load_model(tmp_path / "w.safetensors")
    assert inferred.config == config
    _assert_identical(model, inferred)
