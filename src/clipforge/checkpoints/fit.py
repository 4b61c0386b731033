"""Whether weights and a tokenizer fit an architecture, decided from shapes alone.

The expected tensors come from a model built on the "meta" device (shapes and dtypes, no memory), so a
file whose tensors do not fit its config is refused before a real model is allocated or a tensor is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from clipforge.checkpoints.openai import KNOWN_EXTRAS
from clipforge.checkpoints.safe_unpickle import CheckpointError
from clipforge.models import CLIPConfig, create_model

StateDict = Mapping[str, torch.Tensor]


def describe(config: CLIPConfig) -> str:
    """A one-line summary of an architecture, for messages."""
    v, t = config.vision, config.text
    if v.kind == "vit":
        vision = f"ViT {v.image_size}px patch {v.patch_size} width {v.width} x{v.layers}"
    else:
        vision = f"ResNet {v.image_size}px width {v.width} stages {v.layers}"
    text = f"text width {t.width} x{t.layers}, context {t.context_length}"
    bias = "; logit bias" if config.logit_bias else ""
    return f"{vision}; {text}; embed {config.embed_dim}{bias}"


def listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


class _NoRandomFill(TorchFunctionMode):
    """Skips `normal_` fills: meta tensors hold no values, and torch's meta `normal_` imports
    torch._dynamo on first use (seconds), where everything else a meta model needs takes milliseconds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.normal_ or func is nn.init.normal_:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def expected_tensors(config: CLIPConfig) -> dict[str, torch.Tensor]:
    """The state dict a model of `config` has, as meta tensors."""
    with torch.device("meta"), _NoRandomFill():
        return create_model(config).state_dict()


def select(expected: StateDict, state_dict: StateDict, from_script: bool = False) -> dict[str, torch.Tensor]:
    """The tensors to load: OpenAI's extra scalars dropped; from a TorchScript tree only what is expected."""
    sd = {k: v for k, v in state_dict.items() if k in expected or k not in KNOWN_EXTRAS}
    return {k: v for k, v in sd.items() if k in expected} if from_script else sd


def check_fits(
    config: CLIPConfig,
    state_dict: StateDict,
    source: str | os.PathLike,
    from_script: bool = False,
    expected: StateDict | None = None,
) -> None:
    """Raise `CheckpointError` naming every missing, unexpected and misshapen key of `state_dict`."""
    expected = expected_tensors(config) if expected is None else expected
    sd = select(expected, state_dict, from_script)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = [
        f"{label}: {listing(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        arch = describe(config)
        raise CheckpointError(f"{source} does not fit the architecture ({arch}): " + "; ".join(problems))


def check_tokenizer_fits(config: CLIPConfig, tokenizer: Any, source: str | os.PathLike) -> None:
    """Every id the tokenizer gives must have a row in the model's token embedding."""
    if tokenizer.vocab_size > config.text.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer ({tokenizer.identity}) has {tokenizer.vocab_size:,} tokens but the "
            f"model embeds only {config.text.vocab_size:,} (text.vocab_size): they were not made together"
        )
