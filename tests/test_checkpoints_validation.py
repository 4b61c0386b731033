"""Model files are untrusted input: config.json read strictly, weights checked on their header before a
model is built, paths kept inside the model directory; `load()` gives a tokenizer that fits the model."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file

from clipforge.checkpoints import CheckpointError, load, load_model, save
from clipforge.checkpoints import native as native_module
from clipforge.checkpoints.fit import expected_tensors
from clipforge.cli import main
from clipforge.models import create_model
from clipforge.models.config import MODEL_CONFIGS
from clipforge.tokenizer import get_tokenizer, train_tokenizer

MICRO = MODEL_CONFIGS["ViT-Micro-16-32"]  # text: width 64, context 77, vocab 49,408
TEXTS = ["a photo of a cat", "a drawing of a dog"]
load_module = importlib.import_module(
    "clipforge.checkpoints.load"
)  # the package exports `load`, the function


def _with_text(**changes) -> object:
    return dataclasses.replace(MICRO, text=dataclasses.replace(MICRO.text, **changes))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A trained vocabulary of a few hundred ids."""
    captions = tmp_path_factory.mktemp("captions") / "captions.txt"
    captions.write_text("a photo of a cat\na photo of a dog\na drawing of a cat\na drawing of a dog\n" * 20)
    return train_tokenizer([captions], vocab_size=600)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A ViT-Micro saved with the trained tokenizer: copy it before changing anything."""
    torch.manual_seed(0)
    return save(create_model(MICRO).eval(), tmp_path_factory.mktemp("saved") / "model", tokenizer)


@pytest.fixture
def model_dir(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model", symlinks=True)


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fail if a real (non-meta) model is built or a weights file's tensors are read."""
    real_create = load_module.create_model

    def create_on_meta_only(config):
        if torch.get_default_device().type != "meta":
            raise AssertionError("a model was built before the weights were checked")
        return real_create(config)

    def no_tensors(*args, **kwargs):
        raise AssertionError("tensors were read before the header was checked")

    monkeypatch.setattr(load_module, "create_model", create_on_meta_only)
    monkeypatch.setattr(load_module, "load_file", no_tensors)
    monkeypatch.setattr(native_module, "load_file", no_tensors)


def _edit_config(directory, edit) -> None:
    path = directory / "config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _set(meta: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[last] = value


BAD_FIELDS = [
    ("model.embed_dim", "64", r"field 'model\.embed_dim' must be an integer, got \"64\""),
    ("model.embed_dim", 64.0, r"field 'model\.embed_dim' must be an integer, got 64\.0"),
    ("model.embed_dim", True, r"field 'model\.embed_dim' must be an integer, got true"),
    ("model.embed_dim", 0, r"field 'model\.embed_dim' must be an integer from 1 to 16,384, got 0"),
    ("model.text.vocab_size", 1e13, r"'model\.text\.vocab_size' must be an integer, got 10000000000000\.0"),
    (
        "model.text.vocab_size",
        15_000_000,
        r"'model\.text\.vocab_size' must be an integer from 2 to 1,048,576",
    ),
    ("model.text.context_length", 1, r"'model\.text\.context_length' must be an integer from 2 to"),
    ("model.text.heads", 3, r"field 'model\.text\.heads' \(3\) must divide 'model\.text\.width' \(64\)"),
    ("model.text.mlp_ratio", "4", r"field 'model\.text\.mlp_ratio' must be a number, got \"4\""),
    ("model.text.mlp_ratio", float("nan"), r"field 'model\.text\.mlp_ratio' must be above 0"),
    ("model.vision.kind", "transformer", r"field 'model\.vision\.kind' must be one of 'vit', 'resnet'"),
    ("model.vision.layers", [1, 1], r"field 'model\.vision\.layers' must be an integer, got \[1, 1\]"),
    ("model.vision.patch_size", 0, r"field 'model\.vision\.patch_size' must be an integer from 1 to 32"),
    ("model.vision.patch_size", 5, r"'model\.vision\.image_size' \(32\) must be a multiple of"),
    ("model.vision.depth", 2, r"unknown field 'model\.vision\.depth'"),
    ("model.activation", "relu", r"field 'model\.activation' must be one of 'quick_gelu', 'gelu'"),
    ("model.logit_bias", "yes", r"field 'model\.logit_bias' must be true or false"),
    ("model", [64], r"field 'model' must be an object"),
    ("format_version", True, r"format_version True"),
    ("tokenizer", {"path": 5}, r"field 'tokenizer' must be null or"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS]
)
def test_config_fields_are_checked_before_anything_is_built(
    model_dir, nothing_allocated, field, value, message
):
    _edit_config(model_dir, lambda meta: _set(meta, field, value))
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(model_dir)
    assert str(caught.value).startswith(str(model_dir))


def test_a_missing_field_is_named(model_dir, nothing_allocated):
    _edit_config(model_dir, lambda meta: meta["model"]["vision"].pop("heads"))
    with pytest.raises(CheckpointError, match=r"config\.json field 'model\.vision\.heads' is missing"):
        load_model(model_dir)


def test_the_cli_prints_the_error_on_one_line(model_dir, tmp_path, capsys):
    _edit_config(model_dir, lambda meta: _set(meta, "model.embed_dim", "64"))
    code = main(["eval", "retrieval", "--model", str(model_dir), "--data", str(tmp_path / "none.tar")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    problem = "config.json field 'model.embed_dim' must be an integer, got \"64\""
    assert err == f"clipforge eval retrieval: {model_dir}: {problem}"


@pytest.mark.parametrize("name", [*MODEL_CONFIGS, "bias"])
def test_expected_tensors_are_the_models_on_the_meta_device(name):
    # The shapes are built without random fills: the same keys, shapes and dtypes as a meta model's.
    config = dataclasses.replace(MICRO, logit_bias=True) if name == "bias" else MODEL_CONFIGS[name]
    with torch.device("meta"):
        want = {k: (v.shape, v.dtype) for k, v in create_model(config).state_dict().items()}
    got = expected_tensors(config)
    assert all(v.is_meta for v in got.values())
    assert list(got) == list(want) and {k: (v.shape, v.dtype) for k, v in got.items()} == want


def test_a_vocabulary_larger_than_the_weights_is_refused_without_allocating(model_dir, nothing_allocated):
    # 1,000,000 x 64 floats would be 256 MB: refused from the header's 49,408 rows instead.
    _edit_config(model_dir, lambda meta: _set(meta, "model.text.vocab_size", 1_000_000))
    with pytest.raises(
        CheckpointError,
        match=r"wrong shape: token_embedding\.weight \(49408, 64\) \(model: \(1000000, 64\)\)",
    ):
        load_model(model_dir)


def test_config_and_header_sizes_are_bounded(model_dir, tmp_path, nothing_allocated):
    path = model_dir / "config.json"
    path.write_text(path.read_text() + " " * (1 << 20))
    with pytest.raises(CheckpointError, match=r"config\.json is over 1,048,576 bytes"):
        load_model(model_dir)
    # A header length far past the file's size (or the 16 MiB limit) is refused before reading it.
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b'{"a": 1}')
    with pytest.raises(CheckpointError, match=r"safetensors header of 1,099,511,627,776 bytes"):
        load_model(huge)


def test_a_header_that_declares_more_than_the_file_holds_is_refused(tmp_path, nothing_allocated):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file(_state(create_model(MICRO)), path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)
    with pytest.raises(CheckpointError, match=r"tensor '.+' in the safetensors header declares .* bytes"):
        load_model(path)


def test_plain_safetensors_are_checked_against_a_named_architecture_before_reading(
    tmp_path, nothing_allocated
):
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file(_state(create_model(_with_text(context_length=24))), path)
    with pytest.raises(
        CheckpointError, match=r"wrong shape: positional_embedding \(24, 64\) \(model: \(77, 64\)\)"
    ):
        load_model("ViT-Micro-16-32", pretrained=path)


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_sizes_inferred_from_shapes_are_bounded(tmp_path, nothing_allocated, kind):
    # A 9,000-token context (its attention mask alone: 9,000^2 floats) is past the 8,192 bound.
    torch.manual_seed(0)
    state = _state(create_model(MICRO))
    state["positional_embedding"] = torch.zeros(9000, 64)
    path = tmp_path / f"w.{kind}"
    torch.save(state, path) if kind == "pt" else save_file(state, path)
    with pytest.raises(
        CheckpointError, match=r"field 'text\.context_length' must be an integer from 2 to 8,192"
    ):
        load_model(path)


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_the_tokenizer_path_must_stay_inside_the_directory(model_dir, tmp_path, escape):
    outside = tmp_path / "outside"
    shutil.copytree(model_dir / "tokenizer", outside)  # a valid tokenizer, but not the model's to read
    if escape == "symlink":
        shutil.rmtree(model_dir / "tokenizer")
        os.symlink(outside, model_dir / "tokenizer")
    else:
        path = "/etc" if escape == "absolute" else "../outside"
        _edit_config(model_dir, lambda meta: _set(meta, "tokenizer.path", path))
    problem = "is an absolute path" if escape == "absolute" else "leads outside the model directory"
    with pytest.raises(CheckpointError, match=problem):
        load(model_dir)
    with pytest.raises(CheckpointError, match=problem):
        load_model(model_dir)


def test_the_weights_file_must_stay_inside_the_directory(model_dir, tmp_path):
    os.replace(model_dir / "model.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"the weights file 'model\.safetensors' leads outside"):
        load_model(model_dir)


def test_symlinks_that_stay_inside_are_followed(model_dir):
    os.rename(model_dir / "tokenizer", model_dir / "tok-v1")
    os.symlink("tok-v1", model_dir / "tokenizer")
    _, _, tok = load(model_dir)
    assert tok.vocab_size < 1000


def test_a_saved_tokenizer_config_is_read_strictly(model_dir):
    path = model_dir / "tokenizer" / "clipforge_tokenizer.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "context_length": "24"}))
    with pytest.raises(
        CheckpointError, match=r"cannot read its tokenizer: .*'context_length' must be an integer"
    ):
        load(model_dir)
    path.write_text(json.dumps({**config, "vocab": "/etc/passwd"}))
    with pytest.raises(CheckpointError, match=r"field 'vocab' must be"):
        load(model_dir)


def test_load_gives_a_tokenizer_at_the_models_context_length(tmp_path, tokenizer):
    config = _with_text(context_length=24, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = create_model(config).eval()
    assert tokenizer.context_length == 77  # saved as it is; the model's length is what load() gives
    loaded, _, tok = load(save(model, tmp_path / "ctx24", tokenizer))
    assert tok.context_length == 24
    tokens = tok(TEXTS)
    assert torch.equal(tokens, tokenizer(TEXTS, context_length=24))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_save_refuses_a_tokenizer_the_model_cannot_embed(tmp_path, tokenizer):
    model = create_model(_with_text(vocab_size=tokenizer.vocab_size - 1))
    with pytest.raises(
        CheckpointError, match=rf"has {tokenizer.vocab_size} tokens but the model embeds only"
    ):
        save(model, tmp_path / "m", tokenizer)
    assert not (tmp_path / "m").exists()


def test_load_refuses_a_saved_tokenizer_the_model_cannot_embed(tmp_path, tokenizer):
    out = save(create_model(_with_text(vocab_size=tokenizer.vocab_size)), tmp_path / "m", tokenizer)
    captions = tmp_path / "more.txt"
    captions.write_text("".join(f"caption number {i} of {i * 7} words\n" for i in range(300)))
    bigger = train_tokenizer([captions], vocab_size=tokenizer.vocab_size + 200)
    assert bigger.vocab_size > tokenizer.vocab_size
    shutil.rmtree(out / "tokenizer")
    bigger.save(out / "tokenizer")
    with pytest.raises(
        CheckpointError, match=r"the tokenizer \(bpe-\w+\) has \d+ tokens but the model embeds"
    ):
        load(out)
    assert load_model(out).config.text.vocab_size == tokenizer.vocab_size  # the weights alone are fine


@pytest.mark.needs_openai_bpe
def test_openai_tokenizer_takes_the_models_context_length(tmp_path):
    torch.manual_seed(0)
    model = create_model(_with_text(context_length=24)).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    for source in (save(model, tmp_path / "dir"), tmp_path / "sd.pt"):
        loaded, _, tok = load(source)
        assert (tok.identity, tok.context_length) == ("openai", 24)
        with torch.no_grad():
            assert loaded.encode_text(tok(TEXTS)).shape == (2, 64)
    assert get_tokenizer().context_length == 77  # the shared default is untouched


@pytest.mark.needs_openai_bpe
def test_openai_archives_get_context_77(tmp_path):
    torch.manual_seed(0)
    model = create_model(MICRO).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow
        images, tokens = torch.randn(1, 3, 32, 32), get_tokenizer()(TEXTS[:1])
        torch.jit.save(torch.jit.trace(model, (images, tokens), check_trace=False), tmp_path / "a.pt")
    _, _, tok = load(tmp_path / "a.pt")
    assert (tok.identity, tok.context_length) == ("openai", 77)


@pytest.mark.needs_openai_bpe
def test_a_small_vocabulary_without_its_tokenizer_is_refused_by_load(tmp_path):
    out = save(create_model(_with_text(vocab_size=600)), tmp_path / "m")
    with pytest.raises(
        CheckpointError, match=r"embeds 600 tokens .* carries no tokenizer, and OpenAI's has 49,408"
    ):
        load(out)
    assert load_model(out).config.text.vocab_size == 600
