"""Reference fixtures for the model tests, produced by OpenAI's own code (`clip-anytorch`).

Run in a side environment, never in CI (see docs/parity.md):

    /work/refenv/bin/python scripts/make_model_fixtures.py tests/fixtures/models

Writes, for small ViT and ResNet configs, seeded random weights in OpenAI's layout plus the reference
outputs of encode_image, encode_text and the logits on fixed inputs (`parity_<name>.safetensors`), and the
state-dict key -> shape layout of the nine paper models built on the meta device (`layouts.json.gz`).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import torch
from clip.model import CLIP as OpenAICLIP
from safetensors.torch import save_file

# (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#  context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
# A 1,000-token vocabulary keeps the fixtures small; EOT is its largest id, as in OpenAI's.
SMALL = {
    "vit": (32, 32, 2, 64, 8, 77, 1000, 48, 2, 2),
    "resnet": (32, 64, (1, 2, 1, 1), 8, None, 77, 1000, 48, 2, 2),
}
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


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every float tensor random (BN statistics too), so no zero-initialized part can hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name == "logit_scale":
                t.fill_(4.6052)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)


def inputs(image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, image_size, image_size, generator=g)
    tokens = torch.zeros(4, 77, dtype=torch.long)
    for i, length in enumerate([2, 7, 30, 77]):  # EOT at very different places, incl. the last slot
        tokens[i, 0] = SOT
        tokens[i, 1 : length - 1] = torch.randint(1, SOT, (length - 2,), generator=g)
        tokens[i, length - 1] = EOT
    return images, tokens


def write_parity(name: str, out: Path) -> None:
    model = OpenAICLIP(*SMALL[name]).eval()
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
    save_file(tensors, out / f"parity_{name}.safetensors", metadata={"config": json.dumps(SMALL[name])})


def write_layouts(out: Path) -> None:
    layouts = {}
    for name, args in PAPER.items():
        with torch.device("meta"):
            model = OpenAICLIP(*args)
        layouts[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    with gzip.open(out / "layouts.json.gz", "wt") as f:
        json.dump(layouts, f)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name in SMALL:
        write_parity(name, out)
    write_layouts(out)
    print("wrote", sorted(p.name for p in out.iterdir()))
