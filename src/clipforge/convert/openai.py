"""OpenAI's format: a state dict in OpenAI's layout that OpenAI's own code loads.

`clip.load(path, jit=False)` (github.com/openai/CLIP, clip/clip.py) tries the file as a TorchScript archive,
then `torch.load`s it as a state dict and rebuilds the model with `build_model` (clip/model.py), which
reads the architecture from the shapes under fixed rules: 64-wide attention heads (every transformer, and
the ResNet's attention pool over 32 x width channels), MLPs 4x as wide as their blocks, QuickGELU, no
logit bias. `incompatibilities` lists what a model does differently, so such a model is refused before a
file is written rather than rebuilt wrongly. The tensors are written in float32; `clip.load` casts them to
fp16 itself on a GPU. A `.safetensors` destination gets the same tensors without pickle (read by clipforge,
OpenCLIP and most tools, though not by `clip.load`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipforge.models.config import CLIPConfig

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def incompatibilities(config: CLIPConfig) -> list[str]:
    """What OpenAI's `build_model` would rebuild differently from `config` (empty: nothing)."""
    v, t = config.vision, config.text
    problems = []
    if config.activation != "quick_gelu":
        problems.append(f"activation {config.activation!r} (OpenAI's code always uses QuickGELU)")
    channels = v.width * 32 if v.kind == "resnet" else v.width
    if v.heads != max(1, channels // 64):
        problems.append(f"{v.heads} image heads (OpenAI's rule: {max(1, channels // 64)}, 64 wide)")
    if t.heads != max(1, t.width // 64):
        problems.append(f"{t.heads} text heads (OpenAI's rule: {max(1, t.width // 64)}, 64 wide)")
    for tower, ratio in (("image", v.mlp_ratio), ("text", t.mlp_ratio)):
        if tower == "image" and v.kind == "resnet":
            continue
        if ratio != 4.0:
            problems.append(f"{tower} MLP ratio {ratio:g} (OpenAI's: 4)")
    if config.logit_bias:
        problems.append("a logit bias (OpenAI's model has none)")
    return problems


def write_openai(model: Any, path: Path, safetensors: bool = False) -> None:
    """The model's state dict as a torch.save file of plain tensors (or a safetensors file)."""
    from clipforge.checkpoints.native import unshared_tensors

    tensors = unshared_tensors(model, torch.float32)
    if safetensors:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
