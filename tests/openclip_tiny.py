"""Two tiny ViTs in OpenCLIP's config language, their inputs and the comparison of their features, for the
OpenCLIP interop and parity tests."""

from __future__ import annotations

import torch

from clipforge.convert import openclip
from clipforge.models import CLIPConfig
from tolerances import rounding_budget, rounding_tolerance

# Two tiny ViTs in OpenCLIP's config language: GELU with 32-wide heads (2 per tower), and QuickGELU with
# 64-wide heads (OpenAI's rule, so OpenAI's build_model reads it too). A short context and vocabulary keep
# them small; nothing in the code depends on 77 or 49,408.
TINY_CFGS = {
    "gelu": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 64, "heads": 2, "layers": 2},
    },
    "quickgelu": {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 64, "heads": 1, "layers": 2},
    },
}


def tiny_config(kind: str) -> CLIPConfig:
    return openclip.config_from_openclip(TINY_CFGS[kind])


def batches(config: CLIPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """4 images and 4 texts: random ids, the end token (the largest id) at different places, zeros after."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, config.vision.image_size, config.vision.image_size, generator=g)
    length, eot = config.text.context_length, config.text.vocab_size - 1
    tokens = torch.randint(1, eot, (4, length), generator=g)
    for row, end in enumerate((3, 7, 11, length - 1)):
        tokens[row, end] = eot
        tokens[row, end + 1 :] = 0
    return images, tokens


def features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"image": model.encode_image(images), "text": model.encode_text(tokens)}


def assert_close(got: dict, want: dict, config: CLIPConfig) -> None:
    for tower, key in (("image", "image"), ("text", "text")):
        tol = rounding_tolerance(want[key], *rounding_budget(config, tower))
        diff = (got[key] - want[key]).abs().max().item()
        assert diff <= tol, f"{key}: {diff:.2e} > {tol:.2e}"
