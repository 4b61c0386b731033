"""OpenCLIP interop: its model configs, checkpoints and hub directories (parity with open_clip itself:
test_convert_openclip_parity.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from types import SimpleNamespace

import pytest
import torch

import clipforge.tokenizer
from clipforge.checkpoints import CheckpointError, load, load_model, registry
from clipforge.checkpoints.load import open_model
from clipforge.checkpoints.native import unshared_tensors
from clipforge.checkpoints.openai import infer_config
from clipforge.convert import openclip
from clipforge.models import create_model
from clipforge.models.config import MODEL_CONFIGS, PAPER_MODELS
from clipforge.transforms import OPENAI_MEAN
from conftest import randomized_model
from openclip_tiny import TINY_CFGS, tiny_config

OPENCLIP_NAMES = [n for n in MODEL_CONFIGS if n.startswith(openclip.PREFIX)]


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- model configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*OPENCLIP_NAMES, *PAPER_MODELS, "ViT-Micro-16-32", "RN-Tiny-64"])
def test_configs_cross_to_openclip_and_back(name):
    config = MODEL_CONFIGS[name]
    cfg = json.loads(json.dumps(openclip.config_to_openclip(config)))
    assert openclip.config_from_openclip(cfg) == config


def test_published_shapes_and_names():
    # OpenCLIP's published ViT-H-14: head width 80 (16 heads of 1280), GELU, 986,109,441 parameters.
    h14 = openclip.config_from_openclip(
        {
            "embed_dim": 1024,
            "vision_cfg": {
                "image_size": 224,
                "layers": 32,
                "width": 1280,
                "head_width": 80,
                "patch_size": 14,
            },
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
        }
    )
    assert h14 == MODEL_CONFIGS["openclip/ViT-H-14"] and h14.activation == "gelu"
    assert MODEL_CONFIGS["openclip/ViT-B-32-quickgelu"] == MODEL_CONFIGS["ViT-B-32"]  # OpenAI's model
    assert openclip.openclip_name(MODEL_CONFIGS["ViT-B-32"]) == "ViT-B-32-quickgelu"
    assert openclip.openclip_name(MODEL_CONFIGS["RN50"]) == "RN50-quickgelu"
    assert openclip.openclip_name(MODEL_CONFIGS["openclip/ViT-bigG-14"]) == "ViT-bigG-14"
    assert openclip.openclip_name(tiny_config("gelu")) is None
    with torch.device("meta"):
        assert sum(p.numel() for p in create_model("openclip/ViT-H-14").parameters()) == 986_109_441


def test_shape_inference_finds_openclip_head_counts():
    # ViT-g-14's 16 heads of 88 are not OpenAI's 64-wide rule (22); its stated MLP ratio 4.3637 is not
    # what the shapes give (6144 / 1408): the registered config is still found, QuickGELU assumed.
    with torch.device("meta"):
        sd = create_model("openclip/ViT-g-14").state_dict()
    inferred = infer_config(sd)
    assert inferred.vision.heads == 16 and inferred.vision.mlp_ratio == 4.3637
    assert dataclasses.replace(inferred, activation="gelu") == MODEL_CONFIGS["openclip/ViT-g-14"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["vision_cfg"].update(ls_init_value=1e-5), r"'vision_cfg\.ls_init_value' = 1e-05 builds"),
        (lambda c: c.update(custom_text=True), r"'custom_text' = true builds a network"),
        (lambda c: c["text_cfg"].update(hf_model_name="roberta-base"), r"'text_cfg\.hf_model_name'"),
        (lambda c: c["vision_cfg"].update(timm_model_name="convnext_base"), r"vision_cfg\.timm_model_name"),
        (lambda c: c["text_cfg"].update(pool_type="last"), r"'text_cfg\.pool_type' = \"last\""),
        (lambda c: c.update(frobnicate=1), r"'frobnicate' is not supported"),
        (lambda c: c["vision_cfg"].update(width="64"), r"'vision_cfg\.width' must be a positive integer"),
        (lambda c: c["text_cfg"].update(heads=3), r"refuses: field 'text\.heads' \(3\) must divide"),
        (lambda c: c.update(quick_gelu="yes"), r"'quick_gelu' must be true or false"),
    ],
)
def test_configs_clipforge_cannot_build_are_refused_by_name(edit, message):
    cfg = json.loads(json.dumps(TINY_CFGS["gelu"]))
    edit(cfg)
    with pytest.raises(CheckpointError, match=f"where.json: .*{message}"):
        openclip.config_from_openclip(cfg, "where.json")


def test_neutral_options_are_accepted():
    cfg = json.loads(json.dumps(TINY_CFGS["gelu"]))
    cfg["vision_cfg"].update(patch_dropout=0.5, ls_init_value=None, pool_type="tok")
    cfg["text_cfg"].update(pad_id=0, hf_tokenizer_name=None)
    cfg.update(init_logit_scale=2.6, cast_dtype="bf16", init_logit_bias=-10.0)
    assert openclip.config_from_openclip(cfg) == dataclasses.replace(tiny_config("gelu"), logit_bias=True)


# ---- files: checkpoints and hub directories -----------------------------------------------------------


def test_training_checkpoint_with_params_txt(tmp_path):
    # open_clip_train's layout: the run's params.txt names the architecture (GELU: not guessable).
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "params.txt").write_text("batch_size: 256\nmodel: ViT-H-14\nprecision: amp\n")
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_3.pt"
    config, note = openclip.checkpoint_config({"epoch": 3, "state_dict": {}}, ckpt)
    assert config == MODEL_CONFIGS["openclip/ViT-H-14"] and note is None
    (tmp_path / "run" / "params.txt").write_text("model: ViT-B-32\nforce_quick_gelu: True\n")
    assert openclip.checkpoint_config({"epoch": 3, "state_dict": {}}, ckpt)[0] == MODEL_CONFIGS["ViT-B-32"]
    (tmp_path / "run" / "params.txt").write_text("model: coca_ViT-B-32\n")
    config, note = openclip.checkpoint_config({"epoch": 3, "state_dict": {}}, ckpt)
    assert config is None and "'coca_ViT-B-32', which clipforge does not register" in note


def test_training_checkpoint_is_read_safely_and_warns_about_the_activation(tmp_path):
    model = randomized_model(tiny_config("quickgelu"), layernorms=True)
    opt = torch.optim.AdamW(model.parameters())
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": state, "optimizer": opt.state_dict()}, path)
    with pytest.warns(UserWarning, match="QuickGELU assumed"):
        loaded = load_model(path)
    assert same_state(loaded, model) and loaded.config == model.config
    # The architecture by name wins, and no warning.
    gelu = randomized_model(tiny_config("gelu"), layernorms=True)
    torch.save({"epoch": 1, "state_dict": gelu.state_dict()}, path)
    assert same_state(load_model(tiny_config("gelu"), pretrained=path), gelu)


@pytest.mark.parametrize("kind", ["gelu", "quickgelu"])
@pytest.mark.parametrize("layout", ["checkpoint", "hub", "hub-bin"])
def test_clipforge_openclip_clipforge_is_exact(tmp_path, kind, layout):
    model = randomized_model(tiny_config(kind), layernorms=True)
    if layout == "checkpoint":
        path = tmp_path / "model.pt"
        openclip.write_checkpoint(model, path)
    else:
        path = tmp_path / "hub"
        path.mkdir()
        openclip.write_hub(model, path)
        if layout == "hub-bin":  # OpenCLIP's older pickled weights file
            sd = load_model(path).state_dict()
            (path / openclip.SAFETENSORS_FILE).unlink()
            torch.save(sd, path / "open_clip_pytorch_model.bin")
    loaded = load_model(path)  # the activation and head counts come with the file
    assert loaded.config == model.config and same_state(loaded, model)


def test_hub_directory_preprocessing_is_followed(tmp_path, monkeypatch):
    model = randomized_model(tiny_config("gelu"), layernorms=True)
    openclip.write_hub(model, tmp_path)
    meta = json.loads((tmp_path / openclip.CONFIG_FILE).read_text())
    assert meta["preprocess_cfg"]["mean"] == list(OPENAI_MEAN)
    meta["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])  # OpenCLIP's ViT-L-14 laion2b
    (tmp_path / openclip.CONFIG_FILE).write_text(json.dumps(meta))
    monkeypatch.setattr(clipforge.tokenizer, "get_tokenizer", stub_tokenizer)
    _, preprocess, _ = load(tmp_path)
    assert [float(x) for x in (*preprocess.mean, *preprocess.std)] == [0.5] * 6
    meta["preprocess_cfg"]["std"] = [0.5, 0.0, 0.5]
    (tmp_path / openclip.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"'preprocess_cfg\.std' must be 3 numbers \(std above 0\)"):
        load_model(tmp_path)


def stub_tokenizer(path=None, context_length=None):  # OpenAI's vocabulary is not needed here
    return SimpleNamespace(vocab_size=300, path=path, context_length=context_length)


def test_bad_hub_directories_are_named(tmp_path):
    (tmp_path / openclip.CONFIG_FILE).write_text(json.dumps({"model_cfg": TINY_CFGS["gelu"]}))
    with pytest.raises(CheckpointError, match=f"{tmp_path} has open_clip_config.json but no weights"):
        load_model(tmp_path)
    (tmp_path / openclip.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"cannot read {tmp_path / openclip.CONFIG_FILE}"):
        load_model(tmp_path)
    (tmp_path / openclip.CONFIG_FILE).write_text(" " * (openclip.MAX_JSON_BYTES + 1))
    with pytest.raises(CheckpointError, match="not an OpenCLIP config"):
        load_model(tmp_path)


@pytest.mark.needs_openai_bpe  # the transformers directory is written with OpenAI's tokenizer files
def test_directories_are_recognized_by_content(tmp_path):
    from clipforge.checkpoints import read_weights
    from clipforge.convert.hf import write_hf

    gelu = dataclasses.replace(MODEL_CONFIGS["ViT-Micro-16-32"], activation="gelu")
    model = randomized_model(gelu, layernorms=True)
    write_hf(model, None, tmp_path / "both")
    hf_weights = tmp_path / "both" / "model.safetensors"
    assert read_weights(hf_weights).format == "transformers CLIPModel directory"
    assert same_state(load_model(hf_weights), model)
    openclip.write_hub(model, tmp_path / "both")  # as on the Hub: both layouts side by side
    assert read_weights(tmp_path / "both").format == "OpenCLIP hub directory"
    assert same_state(load_model(tmp_path / "both"), model)


def test_a_directory_nothing_recognizes_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a directory without config.json or open_clip"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'} is not a clipforge config"):
        load_model(tmp_path)


# ---- pretrained names ---------------------------------------------------------------------------------


def test_openclip_pretrained_names_download_verify_and_load(file_server, tmp_path, monkeypatch):
    base, root, _ = file_server
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    model = randomized_model(tiny_config("gelu"), layernorms=True)
    from safetensors.torch import save_file

    save_file(unshared_tensors(model), root / "open_clip_model.safetensors")
    digest = hashlib.sha256((root / "open_clip_model.safetensors").read_bytes()).hexdigest()
    monkeypatch.setitem(MODEL_CONFIGS, "openclip/Tiny", tiny_config("gelu"))
    weights = registry.PretrainedWeights(
        f"{base}/open_clip_model.safetensors",
        digest,
        architecture="openclip/Tiny",
        cache_name="tiny.safetensors",
    )
    monkeypatch.setitem(registry.OPENCLIP_PRETRAINED, "openclip/Tiny:web", weights)
    assert "openclip/Tiny:web" in registry.available_pretrained()
    assert same_state(load_model("openclip/Tiny:web"), model)  # the GELU architecture comes from the name
    assert same_state(load_model("openclip/Tiny", pretrained="web"), model)  # OpenCLIP's (name, tag) pair
    assert (tmp_path / "cache" / "weights" / "tiny.safetensors").is_file()
    assert open_model("openclip/Tiny:web")[1].preprocess is None  # OpenAI's statistics
    # A name whose images OpenCLIP normalizes otherwise carries the statistics that load() builds its
    # transform from, as an OpenCLIP hub directory's preprocess_cfg does.
    inception = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setitem(
        registry.OPENCLIP_PRETRAINED, "openclip/Tiny:web", dataclasses.replace(weights, preprocess=inception)
    )
    monkeypatch.setattr(clipforge.tokenizer, "get_tokenizer", stub_tokenizer)
    for _, preprocess, _ in (load("openclip/Tiny:web"), load("openclip/Tiny", pretrained="web")):
        assert [float(x) for x in (*preprocess.mean, *preprocess.std)] == [0.5] * 6
    wrong = dataclasses.replace(weights, sha256="0" * 64, cache_name="other.safetensors")
    monkeypatch.setitem(registry.OPENCLIP_PRETRAINED, "openclip/Tiny:web", wrong)
    with pytest.raises(ValueError, match="SHA-256"):
        load_model("openclip/Tiny:web")
    assert not (tmp_path / "cache" / "weights" / "other.safetensors").exists()


def test_the_registered_openclip_weights():
    for name, weights in registry.OPENCLIP_PRETRAINED.items():
        arch, tag = name.split(":")
        assert weights.architecture == arch and arch in MODEL_CONFIGS and tag
        assert len(weights.sha256) == 64 and int(weights.sha256, 16) >= 0
        assert weights.url.startswith("https://huggingface.co/") and "/resolve/" in weights.url
        assert "/resolve/main/" not in weights.url  # pinned to a revision: the bytes cannot change
        assert weights.filename.endswith(".safetensors")
