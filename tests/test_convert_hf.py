"""transformers CLIPModel directories: exact round trips, parity with transformers' own model and
processor, directories transformers wrote, and malformed or hostile directories refused by name."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from clipforge.checkpoints import CheckpointError, UnsafeCheckpointError
from clipforge.convert.hf import from_hf_state_dict, key_table, read_hf, to_hf_state_dict, write_hf
from clipforge.convert.hf_config import config_to_hf
from clipforge.models import CLIPConfig, TextConfig, VisionConfig, create_model, for_inference
from clipforge.tokenizer import get_tokenizer
from clipforge.transforms import image_transform
from tolerances import rounding_budget, rounding_tolerance

transformers = pytest.importorskip("transformers")  # the `interop` extra

# Every width differs from the others, so a missing or extra transpose cannot fit by accident; the MLP
# ratio is not 4, so the hidden width must travel through intermediate_size; several heads per tower.
VISION = VisionConfig("vit", 32, 48, 2, heads=3, patch_size=8, mlp_ratio=2.5)


def tiny(activation: str, vocab_size: int = 600, context_length: int = 16) -> CLIPConfig:
    text = TextConfig(context_length=context_length, vocab_size=vocab_size, width=32, heads=4, layers=2)
    return CLIPConfig(24, VISION, text, activation=activation)


@torch.no_grad()
def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Parameters no test can pass by accident: biases and LayerNorms away from 0 and 1 (a fresh model's
    zero biases would hide a q/k/v mix-up of them), and every weight doubled, so attention is sharp and a
    swapped query and key shows (with near-uniform attention they barely matter)."""
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1:
            p.add_(torch.randn_like(p) * 0.3)
        elif "embedding" not in name:
            p.mul_(2.0)
    return module.eval()


def model_of(config: CLIPConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomized(create_model(config), seed)


def hf_features(hf_model, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' projected features (get_*_features return an output object, or a tensor before v5)."""
    with torch.no_grad():
        image = hf_model.get_image_features(pixel_values=images)
        text = hf_model.get_text_features(input_ids=ids)
    pooled = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text)]
    return pooled[0], pooled[1]


def assert_features_match(model, hf_model, images: torch.Tensor, ids: torch.Tensor, hf_ids=None) -> None:
    """Within fp32 rounding of each tower's chain of products (tolerances.rounding_budget): the two
    implementations run the same operations and differ only in the order their sums are taken."""
    with torch.no_grad():
        ours = model.encode_image(images), model.encode_text(ids)
    theirs = hf_features(hf_model, images, ids if hf_ids is None else hf_ids)
    for tower, a, b in zip(("image", "text"), ours, theirs, strict=True):
        tol = rounding_tolerance(a, *rounding_budget(model.config, tower))
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= tol, (tower, (a - b).abs().max().item(), tol)


def token_rows(eot: int, vocab: int, context: int, seed: int = 0) -> torch.Tensor:
    """Rows SOT-free random ids with the end token (the largest id) at several positions, zero padded."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(4, context, dtype=torch.long)
    for row, end in enumerate((2, 5, context // 2, context - 1)):
        rows[row, :end] = torch.randint(1, vocab - 2, (end,), generator=g)
        rows[row, end] = eot
    return rows


@pytest.fixture(scope="module")
def trained(tokenizer_dir):
    return get_tokenizer(tokenizer_dir, context_length=16)


# ---- the key table ------------------------------------------------------------------------------------


def test_key_table_maps_every_tensor_of_both_models_exactly_once(trained):
    config = tiny("quick_gelu")
    table = key_table(config)
    ours = [entry[0] for entry in table]
    theirs = [name for entry in table for name in entry[1]]
    hf_config = transformers.CLIPConfig.from_dict(
        config_to_hf(config, trained.sot_token_id, trained.eot_token_id)
    )
    with torch.device("meta"):
        hf_keys = transformers.CLIPModel(hf_config).state_dict().keys()
    assert sorted(ours) == sorted(create_model(config).state_dict())
    assert sorted(theirs) == sorted(hf_keys)


def test_state_dict_conversion_is_exact_both_ways():
    config = tiny("gelu")
    sd = model_of(config).state_dict()
    back = from_hf_state_dict(config, to_hf_state_dict(config, sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


# ---- clipforge -> transformers -> clipforge --------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_round_trip_is_exact(tmp_path, trained, activation):
    model = model_of(tiny(activation))
    write_hf(model, trained, tmp_path / "hf")
    config, sd, tokenizer = read_hf(tmp_path / "hf")
    assert config == model.config
    expected = model.state_dict()
    assert set(sd) == set(expected)
    assert all(sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in expected.items())
    assert tokenizer.merges == trained.merges and tokenizer.name == "trained"
    assert torch.equal(tokenizer(["a red square"]), trained(["a red square"]))
    assert not [p for p in tmp_path.iterdir() if p.name != "hf"]  # no temporaries left beside it


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_transformers_computes_the_same_features(tmp_path, trained, activation):
    model = model_of(tiny(activation), seed=1)
    write_hf(model, trained, tmp_path / "hf")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = token_rows(trained.eot_token_id, trained.vocab_size, 16)
    assert_features_match(model, hf_model, images, ids)
    # transformers pads with the end token; it reads each text at the first one, clipforge at the argmax
    padded = torch.where(
        (ids == 0) & (torch.arange(16) > ids.argmax(-1, keepdim=True)), trained.eot_token_id, ids
    )
    assert_features_match(model, hf_model, images, ids, hf_ids=padded)


def test_the_parity_check_would_catch_a_swapped_query_and_key(tmp_path, trained):
    model = model_of(tiny("quick_gelu"), seed=2)
    write_hf(model, trained, tmp_path / "hf")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    layer = hf_model.vision_model.encoder.layers[0].self_attn
    with torch.no_grad():
        q, k = layer.q_proj.weight.clone(), layer.k_proj.weight.clone()
        layer.q_proj.weight.copy_(k)
        layer.k_proj.weight.copy_(q)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = model.encode_image(images).detach()
    theirs, _ = hf_features(hf_model, images, token_rows(trained.eot_token_id, 600, 16)[:1])
    tol = rounding_tolerance(ours, *rounding_budget(model.config, "image"))
    assert (ours - theirs).abs().max().item() > 100 * tol


def test_processor_gives_the_tokenizer_ids_and_the_eval_transform_pixels(tmp_path, trained):
    model = model_of(tiny("quick_gelu"))
    write_hf(model, trained, tmp_path / "hf")
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    captions = ["a red square", "three  pink\trings!!", "on the left, one star", "don't stop"]
    assert_same_ids(processor, trained, captions, 16)
    # Images whose resize leaves even margins to crop (an odd margin is cut one pixel to the other side by
    # transformers' center crop: docs/interop-hf.md).
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 64), (90, 40), (17, 17)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([image_transform(32)(im) for im in images])
    # one uint8 level after normalization: the room docs/preprocessing.md allows Pillow's bicubic filter
    assert (pixels - ours).abs().max().item() <= 1 / (255 * 0.26130258)


def assert_same_ids(processor, tokenizer, captions: list[str], context: int) -> None:
    got = processor(text=captions, padding="max_length", max_length=context, return_tensors="pt")
    ids, mask = got["input_ids"], got["attention_mask"].bool()
    ours = tokenizer(captions, context_length=context)
    assert torch.equal(ids[mask], ours[mask])  # the same ids; the padding is the end token there, 0 here
    assert torch.equal(mask, torch.arange(context) <= ours.argmax(-1, keepdim=True))


@pytest.mark.needs_openai_bpe
def test_openai_vocabulary_round_trips_and_the_processor_agrees(tmp_path):
    tokenizer = get_tokenizer(None, context_length=20)
    model = model_of(tiny("quick_gelu", vocab_size=49408, context_length=20))
    write_hf(model, None, tmp_path / "hf")  # None: OpenAI's tokenizer
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    captions = [
        "a photo of a cat",
        "cat!!",
        "Café naïve Straße",
        "日本語の写真です",
        "emoji 🐱 here",
        "it's ÉCOLE",
    ]
    assert_same_ids(processor, tokenizer, captions, 20)
    _, _, back = read_hf(tmp_path / "hf")
    assert back.name == "openai" and back.vocab_size == 49408


# ---- directories transformers wrote ----------------------------------------------------------------------


def hf_model_of(seed: int = 3):
    """transformers' own CLIPModel of a tiny config (its own initialization, then randomized)."""
    layers = {"num_hidden_layers": 2, "hidden_act": "gelu"}
    text = {"vocab_size": 600, "hidden_size": 32, "intermediate_size": 80, "num_attention_heads": 4, **layers}
    text |= {"max_position_embeddings": 16, "bos_token_id": 598, "eos_token_id": 599, "pad_token_id": 599}
    vision = {"hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 3, **layers}
    vision |= {"image_size": 32, "patch_size": 8}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(seed)
    return randomized(transformers.CLIPModel(config), seed)


def save_bin(hf_model, directory, zip_format: bool) -> None:
    """What transformers wrote with safe_serialization=False: a torch.save'd state dict (older releases
    kept the position_ids buffers in it); legacy (non-zip) torch.save files too."""
    hf_model.config.save_pretrained(directory)
    sd = dict(hf_model.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, directory / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "legacy-bin"])
def test_reads_a_directory_transformers_wrote(tmp_path, layout):
    hf_model = hf_model_of()
    if layout == "safetensors":
        hf_model.save_pretrained(tmp_path)
    elif layout == "sharded":
        hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        save_bin(hf_model, tmp_path, zip_format=layout == "bin")
    config, sd, tokenizer = read_hf(tmp_path)
    assert tokenizer is None  # the model alone was saved
    assert (
        config.activation == "gelu"
        and config.vision.mlp_ratio * 48 == 192
        and config.text.mlp_ratio * 32 == 80
    )
    model = create_model(config).eval()
    model.load_state_dict(sd, strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_features_match(model, hf_model, images, token_rows(599, 600, 16, seed=1))


# ---- refusals ------------------------------------------------------------------------------------------


@pytest.fixture
def written(tmp_path, trained):
    return write_hf(model_of(tiny("quick_gelu")), trained, tmp_path / "hf")


def edit_config(directory, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def edit_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_missing_and_misshapen_tensors_are_named(written):
    gone = "vision_model.post_layernorm.bias"
    edit_weights(written, lambda sd: sd.pop(gone))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: missing tensor '{gone}'"):
        read_hf(written)
    key = "text_model.encoder.layers.1.self_attn.k_proj.weight"
    edit_weights(written, lambda sd: sd.update({gone: torch.zeros(48), key: torch.zeros(32, 31)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}' has shape \(32, 31\)"):
        read_hf(written)


def test_config_fields_clipforge_cannot_compute_are_refused(written):
    edit_config(written, lambda c: c["text_config"].update(hidden_act="gelu_new"))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'text_config\.hidden_act' is 'gelu_new'"):
        read_hf(written)
    edit_config(written, lambda c: c["text_config"].update(hidden_act="quick_gelu", layer_norm_eps=1e-6))
    with pytest.raises(CheckpointError, match=r"field 'text_config\.layer_norm_eps' is 1e-06"):
        read_hf(written)
    edit_config(written, lambda c: c["text_config"].update(layer_norm_eps=1e-5, num_hidden_layers=10**9))
    with pytest.raises(
        CheckpointError, match=r"field 'text_config\.num_hidden_layers' must be an integer from 1"
    ):
        read_hf(written)
    edit_config(written, lambda c: c["text_config"].update(num_hidden_layers=2, num_attention_heads=5))
    with pytest.raises(
        CheckpointError, match=r"config\.json: the architecture it describes is refused.*heads"
    ):
        read_hf(written)


def test_a_bin_whose_pickle_calls_os_system_is_refused_without_running(tmp_path, written):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (written / "model.safetensors").unlink()
    with zipfile.ZipFile(written / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"logit_scale": Payload()}, protocol=2))
        zf.writestr("archive/byteorder", "little")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*system"):
        read_hf(written)
    assert not marker.exists()


def test_a_vocabulary_that_is_not_its_merges_is_refused(written):
    vocab = json.loads((written / "vocab.json").read_text())
    vocab["a</w>"], vocab["b</w>"] = vocab["b</w>"], vocab["a</w>"]
    (written / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"vocab\.json: token '[ab]</w>' has id"):
        read_hf(written)


def test_eos_token_other_than_the_end_token_is_refused(written):
    edit_config(written, lambda c: c["text_config"].update(eos_token_id=2))  # transformers: the argmax
    assert read_hf(written)[2] is not None
    edit_config(written, lambda c: c["text_config"].update(eos_token_id=5))
    with pytest.raises(CheckpointError, match=r"'text_config\.eos_token_id' is 5"):
        read_hf(written)


def test_a_vocabulary_without_its_merges_is_refused(written):
    (written / "merges.txt").unlink()
    with pytest.raises(
        CheckpointError, match=r"needs both vocab\.json and merges\.txt; merges\.txt is absent"
    ):
        read_hf(written)


def test_write_refuses_what_transformers_cannot_hold_before_writing(tmp_path, trained):
    resnet = CLIPConfig(16, VisionConfig("resnet", 32, 8, (1, 1, 1, 1), heads=4), tiny("gelu").text)
    with pytest.raises(CheckpointError, match="transformers has no ResNet CLIP"):
        write_hf(create_model(resnet), trained, tmp_path / "a")
    with pytest.raises(CheckpointError, match="for_inference"):
        write_hf(for_inference(create_model(tiny("quick_gelu"))), trained, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a CLIPModel directory"):
        write_hf(create_model(tiny("gelu")), trained, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]


def test_write_replaces_an_earlier_clipmodel_directory(tmp_path, trained):
    first, second = model_of(tiny("gelu"), seed=0), model_of(tiny("gelu"), seed=5)
    write_hf(first, trained, tmp_path / "hf")
    write_hf(second, trained, tmp_path / "hf")
    _, sd, _ = read_hf(tmp_path / "hf")
    assert torch.equal(sd["visual.proj"], second.state_dict()["visual.proj"])
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
