"""Hugging Face transformers' `CLIPModel` directories, in and out.

The interchange point is (CLIPConfig, OpenAI-layout state dict). `read_hf(dir)` gives one from a directory
that `transformers.CLIPModel.save_pretrained` wrote; `write_hf(model, tokenizer, dir)` writes one that
`CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` load and that computes the same features
(to fp32 rounding) from the same token ids. One key table (`key_table`) gives both directions; the configs
are `hf_config.py`, the tokenizer files `hf_tokenizer.py`.

Only ViT image towers: transformers' CLIPModel has no ResNet. A directory read is untrusted: its JSON files
are bounded in size, its config read field by field, every weight checked by name and shape (safetensors
from their headers, before any data is read), and pickled `.bin` files read by the tensor-only unpickler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipforge.atomic import write_directory
from clipforge.checkpoints import native
from clipforge.checkpoints.fit import check_tokenizer_fits, expected_tensors, listing
from clipforge.checkpoints.native import inside
from clipforge.checkpoints.safe_unpickle import CheckpointError, is_zip_archive, read_archive, read_legacy
from clipforge.checkpoints.safetensors_header import read_header
from clipforge.convert.hf_config import check_convertible, config_from_hf, config_to_hf, preprocessor_config
from clipforge.convert.hf_tokenizer import read_tokenizer, tokenizer_files
from clipforge.models import CLIP, CLIPConfig
from clipforge.models.layers import ACTIVATIONS, MLP
from clipforge.tokenizer import get_tokenizer
from clipforge.tokenizer.core import ClipTokenizer

__all__ = ["from_hf_state_dict", "key_table", "read_hf", "to_hf_state_dict", "write_hf"]

StateDict = dict[str, torch.Tensor]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Where transformers keeps the weights, in the order it looks for them.
WEIGHT_FILES = (
    WEIGHTS_FILE,
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
MAX_JSON_BYTES = 16 << 20  # a config is ~5 KB, a shard index ~50 KB
# Older transformers saved these index buffers (arange rows) with the weights: nothing learned, skipped.
POSITION_IDS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# ---- the key table ----------------------------------------------------------------------------------------

# How a tensor moves: as it is; transposed (OpenAI multiplies x @ proj, transformers' Linear stores
# proj.T); or split (OpenAI's fused in_proj rows are [query; key; value], transformers has q/k/v_proj).
COPY, TRANSPOSE, QKV = "copy", "transpose", "qkv"

# One transformer block, after `resblocks.{i}.` (OpenAI) and `encoder.layers.{i}.` (transformers).
_BLOCK = (
    ("ln_1.weight", "layer_norm1.weight", COPY),
    ("ln_1.bias", "layer_norm1.bias", COPY),
    ("attn.in_proj_weight", "self_attn.{}_proj.weight", QKV),
    ("attn.in_proj_bias", "self_attn.{}_proj.bias", QKV),
    ("attn.out_proj.weight", "self_attn.out_proj.weight", COPY),
    ("attn.out_proj.bias", "self_attn.out_proj.bias", COPY),
    ("ln_2.weight", "layer_norm2.weight", COPY),
    ("ln_2.bias", "layer_norm2.bias", COPY),
    ("mlp.c_fc.weight", "mlp.fc1.weight", COPY),
    ("mlp.c_fc.bias", "mlp.fc1.bias", COPY),
    ("mlp.c_proj.weight", "mlp.fc2.weight", COPY),
    ("mlp.c_proj.bias", "mlp.fc2.bias", COPY),
)

# Everything outside the blocks.
_OUTSIDE = (
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", COPY),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", COPY),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", COPY),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", COPY),  # sic: transformers' spelling
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", COPY),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", COPY),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", COPY),
    ("visual.proj", "visual_projection.weight", TRANSPOSE),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", COPY),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", COPY),
    ("ln_final.weight", "text_model.final_layer_norm.weight", COPY),
    ("ln_final.bias", "text_model.final_layer_norm.bias", COPY),
    ("text_projection", "text_projection.weight", TRANSPOSE),
    ("logit_scale", "logit_scale", COPY),
)

Entry = tuple[str, tuple[str, ...], str]


def key_table(config: CLIPConfig) -> list[Entry]:
    """(OpenAI name, transformers names, how) for every tensor of a ViT CLIP of `config`: one
    transformers name, or three (query, key, value) for QKV."""
    check_convertible(config)
    table = [(ours, (theirs,), how) for ours, theirs, how in _OUTSIDE]
    towers = (
        ("visual.transformer.resblocks", "vision_model.encoder.layers", int(config.vision.layers)),
        ("transformer.resblocks", "text_model.encoder.layers", config.text.layers),
    )
    for ours_prefix, hf_prefix, layers in towers:
        for i in range(layers):
            for ours, theirs, how in _BLOCK:
                names = [theirs.format(part) for part in "qkv"] if how == QKV else [theirs]
                table.append((f"{ours_prefix}.{i}.{ours}", tuple(f"{hf_prefix}.{i}.{n}" for n in names), how))
    return table


def to_hf_state_dict(config: CLIPConfig, state_dict: StateDict) -> StateDict:
    """OpenAI layout -> transformers' CLIPModel layout: new contiguous tensors (meta tensors stay meta)."""
    out: StateDict = {}
    for ours, theirs, how in key_table(config):
        tensor = state_dict[ours]
        parts = tensor.chunk(3, dim=0) if how == QKV else (tensor.t() if how == TRANSPOSE else tensor,)
        out.update((name, part.contiguous().clone()) for name, part in zip(theirs, parts, strict=True))
    return out


def from_hf_state_dict(config: CLIPConfig, state_dict: StateDict) -> StateDict:
    """transformers' CLIPModel layout -> OpenAI layout: the keys of `clipforge.create_model(config)`."""
    out: StateDict = {}
    for ours, theirs, how in key_table(config):
        parts = [state_dict[name] for name in theirs]
        if how == QKV:
            out[ours] = torch.cat(parts, dim=0)
        else:
            out[ours] = parts[0].t().contiguous() if how == TRANSPOSE else parts[0]
    return out


# ---- reading a directory ----------------------------------------------------------------------------------


def read_hf(path: str | os.PathLike) -> tuple[CLIPConfig, StateDict, ClipTokenizer | None]:
    """(config, OpenAI-layout state dict, tokenizer or None) of a transformers CLIPModel directory.

    The tensors keep their file's dtype. The tokenizer is read from `vocab.json` + `merges.txt` (None
    without them) and must be a CLIP byte-level BPE: clipforge's tokenizer of the same merges. Raises
    `CheckpointError` naming the file and the field or tensor at fault; nothing from a file is run.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory: a transformers model is a directory")
    config_path = inside(directory, CONFIG_FILE, "the config")
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a transformers model directory")
    hf_config = read_json(config_path)
    config = config_from_hf(hf_config, config_path)
    tokenizer = read_tokenizer(directory, config, hf_config.get("text_config"))
    expected = to_hf_state_dict(config, expected_tensors(config))  # meta tensors: shapes only
    return config, from_hf_state_dict(config, _read_weights(directory, expected)), tokenizer


def read_json(path: Path) -> Any:
    """A JSON file of a model directory, bounded in size."""
    return native.read_json(path, MAX_JSON_BYTES, "a model's JSON file")


def _weight_shards(directory: Path) -> tuple[Path, list[Path]]:
    """(the file that names the weights, the files that hold them): one file, or a shard index's shards."""
    for name in WEIGHT_FILES:
        path = inside(directory, name, "the weights file")
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return path, [path]
        index = read_json(path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{path}: field 'weight_map' must map tensor names to file names")
        shards = [inside(directory, f, "a shard of the index") for f in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{path} names shards that are not in {directory}: {listing(missing)}")
        return path, shards
    raise CheckpointError(f"{directory} holds none of {', '.join(WEIGHT_FILES)}: no weights to read")


def _read_weights(directory: Path, expected: StateDict) -> StateDict:
    """The transformers-layout tensors of the directory, checked name by name and shape by shape
    against `expected`; safetensors data is read only after every header passed."""
    named_by, shards = _weight_shards(directory)
    found: dict[str, tuple[torch.Tensor, Path]] = {}
    for shard in shards:
        if shard.suffix == ".safetensors":
            tensors: Any = read_header(shard)  # meta tensors, checked against the file's size
        else:  # a pickle, read whole (its tensors cannot outgrow the file) by the restricted unpickler
            tensors = read_archive(shard) if is_zip_archive(shard) else read_legacy(shard)
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{shard} holds a {type(tensors).__name__}, not a dict of tensors")
        for key, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{shard}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
            if key in found:
                raise CheckpointError(f"{shard}: tensor {key!r} is also in {found[key][1]}")
            found[key] = (tensor, shard)
    _check_tensors(expected, found, named_by)
    data: StateDict = {}
    for shard in shards:
        if shard.suffix == ".safetensors":
            data.update(_load_safetensors(shard))
    return {k: data.get(k, t) for k, (t, _) in found.items() if k in expected}


def _load_safetensors(path: Path) -> StateDict:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _check_tensors(expected: StateDict, found: dict[str, tuple[torch.Tensor, Path]], named_by: Path) -> None:
    """Every expected tensor present, of its shape, floating point; nothing else but old index buffers."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{named_by}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for key, (tensor, path) in found.items():
        if key in POSITION_IDS and tensor.dim() == 2 and tensor.shape[0] == 1:
            continue
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}: not part of a CLIPModel of its config")
        shape, want = tuple(tensor.shape), tuple(expected[key].shape)
        if shape != want:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape}; its config.json implies {want}")
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {key!r} is {tensor.dtype}, not floating point")


# ---- writing a directory ----------------------------------------------------------------------------------


def write_hf(model: CLIP, tokenizer: ClipTokenizer | None, dst: str | os.PathLike) -> Path:
    """Write `model` as a transformers CLIPModel directory, atomically, with its tokenizer (None: OpenAI's)
    and image preprocessing: `CLIPModel.from_pretrained(dst)` and `CLIPProcessor.from_pretrained(dst)`
    load it. Everything is checked before a file is written; an earlier CLIPModel directory at `dst` is
    replaced, any other non-empty path refused."""
    if not isinstance(model, CLIP):
        raise TypeError(f"write_hf needs a clipforge CLIP model, got {type(model).__name__}")
    config = model.config
    check_convertible(config)
    _check_not_folded(model)
    if tokenizer is None:
        tokenizer = get_tokenizer(None, context_length=config.text.context_length)
    target = Path(dst).absolute()
    check_tokenizer_fits(config, tokenizer, target)
    _check_replaceable(target)
    tensors = to_hf_state_dict(config, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    files = {
        CONFIG_FILE: config_to_hf(config, tokenizer.sot_token_id, tokenizer.eot_token_id),
        "preprocessor_config.json": preprocessor_config(config.vision.image_size),
        **tokenizer_files(tokenizer, config.text.context_length),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False)
            (tmp / name).write_text(text.rstrip("\n") + "\n", encoding="utf-8")

    write_directory(target, write)
    return target


def _check_not_folded(model: CLIP) -> None:
    # `for_inference` folds QuickGELU's scale into the MLP weights: the same function, other weights.
    kind = ACTIVATIONS[model.config.activation]
    if any(isinstance(m, MLP) and not isinstance(m.gelu, kind) for m in model.modules()):
        raise CheckpointError(
            "write_hf needs the model itself, not a for_inference copy: its MLP weights differ"
        )


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"cannot write to {target}: it exists and is not a directory")
    if not any(target.iterdir()):
        return
    config = target / CONFIG_FILE
    meta = read_json(config) if config.is_file() else None
    if not (isinstance(meta, dict) and meta.get("model_type") == "clip"):
        raise CheckpointError(
            f"cannot write to {target}: a non-empty directory that is not a CLIPModel directory"
        )
