"""The model a training run asks for, checked before anything is written: the architecture name, the image
size and the locked blocks it names, the tokenizer, and the weights to start from (`model.pretrained`),
which must fit the architecture (positional embeddings may be resized; see `clipforge.models.resize`).
Each check raises a one-line `ConfigError`; `clipforge.train.validate.validate_run` calls them in order.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from clipforge.checkpoints import CheckpointError, native
from clipforge.checkpoints.load import architecture_of, describe
from clipforge.checkpoints.registry import available_pretrained, canonical_name, has_pretrained
from clipforge.configs import invalid
from clipforge.models import CLIPConfig, available_models, get_config
from clipforge.tokenizer import get_tokenizer
from clipforge.tokenizer.core import CONFIG_FILE as TOKENIZER_CONFIG
from clipforge.train.config import TrainConfig


def check_model_name(cfg: TrainConfig) -> CLIPConfig:
    """The named architecture; a ViT when patch dropout is asked for."""
    try:
        architecture = get_config(cfg.model.name)
    except KeyError:
        names = ", ".join(available_models())
        raise invalid("model.name", cfg.model.name, f"not a registered architecture ({names})") from None
    dropout = cfg.model.patch_dropout
    if dropout > 0 and architecture.vision.kind != "vit":
        raise invalid(
            "model.patch_dropout", dropout, f"needs a ViT image tower; {cfg.model.name} has a ResNet"
        )
    micro = cfg.data.micro_batch_size
    m = cfg.model
    whole_lock = m.lock_image and m.lock_image_unlocked_blocks == 0
    if micro > 0 and architecture.vision.kind != "vit" and not (whole_lock or m.freeze_batchnorm):
        # A training BatchNorm normalizes by micro-batch statistics: the cache would change the update.
        raise invalid(
            "data.micro_batch_size",
            micro,
            f"needs a ViT image tower, model.lock_image (whole) or model.freeze_batchnorm; "
            f"{cfg.model.name}'s ResNet has BatchNorms",
        )
    return architecture


def check_image_size(image_size: int, architecture: CLIPConfig) -> None:
    """`model.image_size` (0: the architecture's) tiles into the image tower's grid."""
    if image_size:
        try:
            dataclasses.replace(architecture.vision, image_size=image_size)
        except ValueError as e:
            raise invalid("model.image_size", image_size, str(e)) from None


def tower_depths(architecture: CLIPConfig) -> dict[str, int]:
    """Residual blocks per tower: transformer blocks, or a ResNet's bottlenecks over its stages."""
    layers = architecture.vision.layers
    image = sum(layers) if isinstance(layers, tuple) else layers
    return {"image": image, "text": architecture.text.layers}


def check_unlocked_blocks(cfg: TrainConfig, architecture: CLIPConfig) -> None:
    """`model.lock_<tower>_unlocked_blocks` is at most the tower's depth (its sign and its lock are checked
    by the config itself)."""
    for tower, depth in tower_depths(architecture).items():
        name = f"lock_{tower}_unlocked_blocks"
        blocks = getattr(cfg.model, name)
        if blocks > depth:
            raise invalid(
                f"model.{name}", blocks, f"more than the {depth} blocks of {cfg.model.name}'s {tower} tower"
            )


def check_freeze_batchnorm(freeze: bool, architecture: CLIPConfig) -> None:
    """`model.freeze_batchnorm` needs an image tower with BatchNorm layers (a ResNet)."""
    if freeze and architecture.vision.kind != "resnet":
        raise invalid(
            "model.freeze_batchnorm", freeze, f"a {architecture.vision.kind} image tower has no BatchNorm"
        )


def check_tokenizer(path: str) -> int:
    """The vocabulary size of the tokenizer `model.tokenizer` names ("" or "openai": OpenAI's)."""
    if path and path != "openai":
        directory = Path(path)
        if not directory.is_dir():
            what = "is a file" if directory.exists() else "no such directory"
            raise invalid(
                "model.tokenizer", path, f"{what}; expected a directory made by `clipforge tokenizer train`"
            )
        if not (directory / TOKENIZER_CONFIG).is_file():
            raise invalid("model.tokenizer", path, f"holds no {TOKENIZER_CONFIG}: not a saved tokenizer")
    try:
        return get_tokenizer(path or None).vocab_size
    except (OSError, ValueError, KeyError) as e:
        raise invalid("model.tokenizer", path, f"cannot be loaded: {e}") from None


def check_pretrained(source: str, trained: CLIPConfig) -> None:
    """`model.pretrained` is a release name, a weights file or a clipforge model directory, and what it holds
    (a release's architecture, a directory's config.json, a file's shapes) must fit the model this config
    trains."""
    if not source:
        return
    if has_pretrained(source):
        saved = get_config(canonical_name(source))
    elif not os.path.exists(source):
        names = ", ".join(available_pretrained())
        raise invalid("model.pretrained", source, f"no such file or directory, nor a release name ({names})")
    elif os.path.isfile(source):
        try:
            saved = architecture_of(source)
        except CheckpointError as e:
            raise invalid("model.pretrained", source, str(e)) from None
    else:
        saved = native_config("model.pretrained", source)
    # The logit bias is the one tensor allowed to differ (`load_pretrained`), and positional embeddings
    # are resized to the image size and a shorter context.
    check_resizable(source, saved, trained)
    resized = dataclasses.replace(
        saved,
        vision=dataclasses.replace(saved.vision, image_size=trained.vision.image_size),
        text=dataclasses.replace(saved.text, context_length=trained.text.context_length),
        logit_bias=trained.logit_bias,
    )
    if resized != trained:  # described as the weights are, before resizing
        check_weights_fit(
            "model.pretrained", source, dataclasses.replace(saved, logit_bias=trained.logit_bias), trained
        )


def check_resizable(source: str, saved: CLIPConfig, trained: CLIPConfig) -> None:
    """Weights start a model with another context length only if it is shorter (`models/resize.py`)."""
    before, after = saved.text.context_length, trained.text.context_length
    if after > before:
        raise invalid(
            "data.context_length",
            after,
            f"longer than the {before} positions of model.pretrained {source}: the text tower has no "
            f"learned positions beyond them (use at most {before})",
        )


def native_config(field: str, directory: str) -> CLIPConfig:
    """The architecture a clipforge model directory (a save or a checkpoint) says it holds."""
    if not native.is_native_dir(directory):
        raise invalid(field, directory, f"a directory without {native.CONFIG_FILE}: no model in it")
    if not (Path(directory) / native.WEIGHTS_FILE).is_file():
        raise invalid(field, directory, f"holds no {native.WEIGHTS_FILE}")
    try:
        return CLIPConfig.from_dict(native.read_config(directory)["model"])
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        raise invalid(field, directory, f"unreadable config: {e}") from None


def check_weights_fit(field: str, source: str, saved: CLIPConfig, trained: CLIPConfig) -> None:
    if saved != trained:
        raise invalid(
            field,
            source,
            f"holds {describe(saved)}, but this config trains {describe(trained)} (model.name, loss.name, "
            "the tokenizer's vocabulary and data.context_length decide it)",
        )
