"""Reference fixtures for the model tests, produced by OpenAI's own code (`clip-anytorch`).

Run with the reference environment's interpreter, never in CI (see docs/parity.md). `$CLIPFORGE_BENCH_ENV` is
that environment, built by `bench/setup_env.sh $CLIPFORGE_BENCH_ENV` (torch, torchvision, clip-anytorch):

    $CLIPFORGE_BENCH_ENV/bin/python scripts/make_model_fixtures.py tests/fixtures/models

Writes, for small ViT and ResNet configs, seeded random weights in OpenAI's layout plus the reference
outputs of encode_image, encode_text and the logits on fixed inputs (`parity_<name>.safetensors`, with the
config and the torch / clip-anytorch versions in its metadata), and the state-dict key -> shape layout of
the nine paper models built on the meta device (`layouts.json.gz`).
"""

from __future__ import annotations

import gzip
import json
import sys
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

try:
    from clip.model import CLIP as OpenAICLIP
    from clip.model import VisionTransformer as OpenAIViT
except ImportError:
    sys.exit(
        "OpenAI's `clip` module is missing: run this with the reference environment's interpreter, "
        "$CLIPFORGE_BENCH_ENV/bin/python (built by bench/setup_env.sh)"
    )

# (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#  context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
# A 1,000-token vocabulary keeps the fixtures small; EOT is its largest id, as in OpenAI's.
SMALL = {
    "vit": (32, 32, 2, 64, 8, 77, 1000, 48, 2, 2),
    "resnet": (32, 64, (1, 2, 1, 1), 8, None, 77, 1000, 48, 2, 2),
}
# OpenAI's CLIP gives a ViT width // 64 heads (1 at width 64) and a ResNet's attention pool
# width * 32 // 64 (4 here). The ViT fixture needs several image heads, so that the head split, the
# per-head scale and the head merge are compared too: its tower is OpenAI's VisionTransformer with 4.
VISION_HEADS = {"vit": 4, "resnet": 8 * 32 // 64}
VOCAB, SOT, EOT = 1000, 998, 999
PAPER = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B-32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B-16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L-14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
}


# Query and key projections get this gain over a unit-variance init: attention logits then have a
# standard deviation of about QK_GAIN**2 (2.25), so each head attends to a few positions. With small
# weights every head attends evenly, its output is the same for any head count, and a wrong head split
# or per-head scale changes the outputs by less than the test's tolerance.
QK_GAIN = 1.5


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every float tensor random (BN statistics too), so no zero-initialized part can hide a bug. Scales
    keep activations near unit size through both towers: projections randn / sqrt(fan_in), norm weights
    near 1, biases and running means small."""
    g = torch.Generator().manual_seed(seed)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.BatchNorm2d)}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            owner, _, leaf = name.rpartition(".")
            noise = torch.randn(t.shape, generator=g)
            if name == "logit_scale":
                t.fill_(4.6052)
            elif leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif owner in norms and leaf == "weight":
                t.copy_(1 + 0.1 * noise)
            elif "embedding" in name:  # token, position and class embeddings
                t.copy_(0.5 * noise)
            elif t.dim() < 2:  # biases and running means
                t.copy_(0.1 * noise)
            elif leaf in ("proj", "text_projection"):  # used as x @ proj: fan-in is the first dimension
                t.copy_(noise / t.shape[0] ** 0.5)
            else:  # Linear / Conv2d / in_proj weights, (out, in, ...)
                t.copy_(noise / t[0].numel() ** 0.5)
                if leaf == "in_proj_weight":
                    t[: 2 * t.shape[1]] *= QK_GAIN
                elif owner.endswith((".q_proj", ".k_proj")):  # the ResNet's attention pool
                    t *= QK_GAIN


def inputs(image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, image_size, image_size, generator=g)
    tokens = torch.zeros(4, 77, dtype=torch.long)
    for i, length in enumerate([2, 7, 30, 77]):  # EOT at very different places, incl. the last slot
        tokens[i, 0] = SOT
        tokens[i, 1 : length - 1] = torch.randint(1, SOT, (length - 2,), generator=g)
        tokens[i, length - 1] = EOT
    return images, tokens


def reference_model(name: str) -> OpenAICLIP:
    """OpenAI's CLIP for a SMALL config, its ViT tower rebuilt with VISION_HEADS heads."""
    embed_dim, resolution, layers, width, patch, *_ = SMALL[name]
    model = OpenAICLIP(*SMALL[name])
    if patch is not None:
        model.visual = OpenAIViT(resolution, patch, width, layers, VISION_HEADS[name], embed_dim)
    return model.eval()


def write_parity(name: str, out: Path) -> None:
    model = reference_model(name)
    randomize(model, seed=0)
    images, tokens = inputs(SMALL[name][1], seed=1)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
        tensors = {
            "input.images": images,
            "input.tokens": tokens,
            "output.image_features": model.encode_image(images),
            "output.text_features": model.encode_text(tokens),
            "output.logits_per_image": logits_per_image,
            "output.logits_per_text": logits_per_text,
        }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tensors.update({f"weights.{k}": v.contiguous() for k, v in model.state_dict().items()})
    made_with = {"torch": torch.__version__, "clip-anytorch": metadata.version("clip-anytorch")}
    meta = {
        "config": json.dumps(SMALL[name]),
        "vision_heads": str(VISION_HEADS[name]),
        "made_with": json.dumps(made_with),
    }
    save_file(tensors, out / f"parity_{name}.safetensors", metadata=meta)


def write_layouts(out: Path) -> None:
    layouts = {}
    for name, args in PAPER.items():
        with torch.device("meta"):
            model = OpenAICLIP(*args)
        layouts[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    with gzip.GzipFile(out / "layouts.json.gz", "wb", mtime=0) as f:  # no timestamp: reproducible bytes
        f.write(json.dumps(layouts).encode())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in SMALL:
        write_parity(name, out)
    write_layouts(out)
    print("wrote", sorted(p.name for p in out.iterdir()))
