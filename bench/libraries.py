"""One adapter per library: build an `Arch` with random weights; encode images and texts; the temperature.

Runs inside a worker process (`bench.worker`), in whichever environment has the library; imports are lazy so
each environment needs only its own libraries. Nothing is downloaded: every model is randomly initialized by
the library's own constructor, with QuickGELU as in OpenAI's released models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.specs import EOT, Arch


class Unsupported(Exception):
    """The library has no such architecture (e.g. HF transformers has no ModifiedResNet CLIP)."""


@dataclasses.dataclass
class Built:
    model: nn.Module
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) -> (B, D), not normalized
    encode_text: Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids -> (B, D), not normalized
    logit_scale: Callable[[], torch.Tensor]  # the learned log inverse temperature
    parameters: int | None = None  # of the model as built, when `model` is an inference copy of it


def build_clipforge(arch: Arch) -> Built:
    from clipforge.models import create_model, get_config

    config = get_config(arch.name)
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=arch.context))
    m = create_model(config)
    return Built(m, m.encode_image, m.encode_text, lambda: m.logit_scale)


def build_openclip(arch: Arch) -> Built:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=arch.vision_layers,  # a tuple builds OpenCLIP's ModifiedResNet
        width=arch.vision_width,
        head_width=64,
        patch_size=arch.patch_size or 16,  # unused by a ResNet
        image_size=arch.image_size,
    )
    text = CLIPTextCfg(
        context_length=arch.context,
        vocab_size=arch.vocab,
        width=arch.text_width,
        heads=arch.text_heads,
        layers=arch.text_layers,
    )
    m = open_clip.CLIP(arch.embed_dim, vision, text, quick_gelu=True)
    return Built(m, m.encode_image, m.encode_text, lambda: m.logit_scale)


def build_hf(arch: Arch) -> Built:
    if arch.vision != "vit":
        raise Unsupported("HF transformers has no ModifiedResNet CLIP")
    from transformers import CLIPConfig, CLIPModel

    text = {
        "hidden_size": arch.text_width,
        "intermediate_size": 4 * arch.text_width,
        "num_attention_heads": arch.text_heads,
        "num_hidden_layers": arch.text_layers,
        "max_position_embeddings": arch.context,
        "vocab_size": arch.vocab,
        "hidden_act": "quick_gelu",
        "eos_token_id": EOT,
    }
    vision = {
        "hidden_size": arch.vision_width,
        "intermediate_size": 4 * arch.vision_width,
        "num_attention_heads": arch.vision_heads,
        "num_hidden_layers": arch.vision_layers,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "hidden_act": "quick_gelu",
    }
    m = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.embed_dim))
    return Built(
        m,
        lambda x: m.get_image_features(pixel_values=x).pooler_output,
        lambda t: m.get_text_features(input_ids=t).pooler_output,
        lambda: m.logit_scale,
    )


def build_openai(arch: Arch) -> Built:
    from clip.model import CLIP

    m = CLIP(
        arch.embed_dim,
        arch.image_size,
        arch.vision_layers,
        arch.vision_width,
        arch.patch_size or None,
        arch.context,
        arch.vocab,
        arch.text_width,
        arch.text_heads,
        arch.text_layers,
    )
    return Built(m, m.encode_image, m.encode_text, lambda: m.logit_scale)


BUILDERS: dict[str, Callable[[Arch], Built]] = {
    "clipforge": build_clipforge,
    "openclip": build_openclip,
    "hf": build_hf,
    "openai": build_openai,
}

# The distribution whose version is reported for each library.
DISTRIBUTIONS = {
    "clipforge": "clipforge",
    "openclip": "open_clip_torch",
    "hf": "transformers",
    "openai": "clip-anytorch",
    "instant": "instant-clip-tokenizer",  # the tokenizer benchmark's extra contender
}


def build(lib: str, arch: Arch, device: str) -> Built:
    torch.manual_seed(0)
    built = BUILDERS[lib](arch)
    built.model.to(device)
    return built


_cache: dict[tuple[str, str, str, bool], Built] = {}


def cached(lib: str, arch: Arch, device: str, int8: bool = False) -> Built:
    """`build` in the form the library infers with, keeping one architecture at a time (its encode cases
    share it).

    clipforge: its inference copy, `clipforge.for_inference` (BatchNorms folded into the convolutions,
    channels-last ResNet, QuickGELU folded; what `clipforge eval` runs), or with `int8` the opt-in int8
    copy built on it (`clipforge.models.int8`). The peers have no such step: their modules as built.
    """
    key = (lib, arch.name, device, int8)
    if key not in _cache:
        if not any(k[:3] == key[:3] for k in _cache):
            _cache.clear()
        _cache[key] = inference_form(build(lib, arch, device), int8)
    return _cache[key]


def inference_form(built: Built, int8: bool) -> Built:
    if not hasattr(built.model, "encode_image") or not hasattr(built.model, "config"):  # not clipforge
        if int8:
            raise Unsupported("int8 inference is clipforge's opt-in mode; the other libraries run without")
        return built
    from clipforge.models import for_inference, quantize_int8

    m = quantize_int8(built.model) if int8 else for_inference(built.model)
    return Built(m, m.encode_image, m.encode_text, lambda: m.logit_scale, describe(built)["parameters"])


def clear_cache() -> None:
    _cache.clear()


def version(lib: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTIONS[lib])
    except PackageNotFoundError:
        return "source checkout" if lib == "clipforge" else "missing"


def describe(built: Built) -> dict[str, Any]:
    """Compared across libraries: a mismatch means the architectures differ (folding does not count)."""
    if built.parameters is not None:
        return {"parameters": built.parameters}
    return {"parameters": sum(p.numel() for p in built.model.parameters())}
