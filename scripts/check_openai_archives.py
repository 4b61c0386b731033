"""Check clipforge's loader against TorchScript archives made the way OpenAI made its releases.

Not a unit test: it needs OpenAI's reference code (`pip install clip-anytorch`, importable as `clip`),
and it writes archives of full-size models (~100-170 MB each, fp16) to a temporary directory.

For each architecture: build OpenAI's `CLIP` with the published hyperparameters and random weights
(BatchNorm statistics randomized too), add the `input_resolution` / `context_length` / `vocab_size`
tensors the releases carry, rebuild it with `clip.model.build_model` (fp16, as released), trace
`forward`, `encode_image` and `encode_text` with `torch.jit.trace_module`, and `torch.jit.save` it. Then
load that file with `clipforge.checkpoints.load_model` (restricted unpickler; `torch.jit.load` and
`torch.load` patched to fail meanwhile) and compare, in fp32 on the CPU:

- the state dict (must equal OpenAI's fp16 weights cast to fp32, bit for bit);
- image and text features and logits against OpenAI's eager model (`model.float()`, as `clip.load`
  does on the CPU) and against OpenAI's TorchScript archive itself loaded with `torch.jit.load`.

    PYTHONPATH=src $CLIPFORGE_BENCH_ENV/bin/python scripts/check_openai_archives.py [ViT-B-32 RN50 ...]

`$CLIPFORGE_BENCH_ENV` is the reference environment, built by `bench/setup_env.sh $CLIPFORGE_BENCH_ENV`
(docs/parity.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import unittest.mock
from pathlib import Path

import torch

# OpenAI's CLIP constructor arguments: embed_dim, image_resolution, vision_layers, vision_width,
# vision_patch_size, context_length, vocab_size, transformer_width, transformer_heads, transformer_layers.
OPENAI_ARGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B-32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B-16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}


def rounding_rtol(config, tower: str) -> float:
    """How far, relative to its largest magnitude, a tower's fp32 output may move by summation order alone:
    eps * sqrt(widest sum) * (longest chain of products), the rule of tests/conftest.py (docs/parity.md)."""
    if tower == "text":
        t = config.text
        depth, terms = 6 * t.layers + 1, max(int(t.mlp_ratio * t.width), t.context_length)
    elif config.vision.kind == "vit":
        v = config.vision
        depth, terms = 6 * v.layers + 2, max(3 * v.patch_size**2, int(v.mlp_ratio * v.width))
    else:
        v = config.vision
        depth, terms = 3 + 3 * sum(v.layers) + 4, 9 * 8 * v.width
    return torch.finfo(torch.float32).eps * terms**0.5 * depth


def tolerances(config, got: dict[str, torch.Tensor], logit_scale: float) -> dict[str, float]:
    """Absolute tolerance per output: features relative to their largest magnitude, logits as
    logit_scale x cosine, which each feature's relative error moves by at most its own."""
    image, text = rounding_rtol(config, "image"), rounding_rtol(config, "text")
    return {
        "image": image * got["image"].abs().max().item(),
        "text": text * got["text"].abs().max().item(),
        "logits": (image + text) * logit_scale,
    }


def openai_state_dict(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict of OpenAI's CLIP for `name`, plus the three scalars of the releases."""
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(*OPENAI_ARGS[name])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
                module.num_batches_tracked.fill_(1000)
    sd = model.state_dict()
    sd["input_resolution"] = torch.tensor(OPENAI_ARGS[name][1])
    sd["context_length"] = torch.tensor(77)
    sd["vocab_size"] = torch.tensor(49408)
    return sd


def inputs(resolution: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, resolution, resolution, generator=g)
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for i, length in enumerate((5, 17, 77)):
        tokens[i, 0] = 49406
        tokens[i, 1 : length - 1] = torch.randint(1, 49405, (length - 2,), generator=g)
        tokens[i, length - 1] = 49407
    return images, tokens


def save_archive(sd: dict[str, torch.Tensor], path: Path, images: torch.Tensor, tokens: torch.Tensor) -> None:
    """OpenAI's fp16 model, traced (forward, encode_image, encode_text) and saved as TorchScript."""
    from clip.model import build_model

    model = build_model({k: v.clone() for k, v in sd.items()})  # fp16, eval, extras dropped
    for key in ("input_resolution", "context_length", "vocab_size"):
        if hasattr(model, key):
            delattr(model, key)  # plain ints on OpenAI's module; tensors in the released archives
        model.register_buffer(key, sd[key])
    # Trace in fp32 (fp16 kernels are patchy on the CPU), then give each tensor back the dtype
    # build_model's convert_weights gave it: fp16 for convolutions, linears, attention and projections,
    # fp32 for the rest, as in the released files.
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    methods = {"forward": (images, tokens), "encode_image": images, "encode_text": tokens}
    traced = torch.jit.trace_module(model.float(), methods, check_trace=False)
    with torch.no_grad():
        for key, tensor in [*traced.named_parameters(), *traced.named_buffers()]:
            tensor.data = tensor.data.to(dtypes[key])
    assert {k: v.dtype for k, v in traced.state_dict().items()} == dtypes
    torch.jit.save(traced, str(path))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def outputs(model, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        logits, _ = model(images, tokens)
        return {"image": model.encode_image(images), "text": model.encode_text(tokens), "logits": logits}


def check(name: str, workdir: Path) -> dict[str, float]:
    from clip.model import build_model

    from clipforge.checkpoints import load_model
    from clipforge.models.config import MODEL_CONFIGS

    sd = openai_state_dict(name, seed=0)
    images, tokens = inputs(OPENAI_ARGS[name][1])
    path = workdir / f"{name}.pt"
    save_archive(sd, path, images, tokens)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / torch.jit.load called by the loader")

    start = time.perf_counter()
    with unittest.mock.patch("torch.jit.load", forbidden), unittest.mock.patch("torch.load", forbidden):
        ours = load_model(path)
    load_s = time.perf_counter() - start
    assert ours.config == MODEL_CONFIGS[name], ours.config

    reference = build_model({k: v.clone() for k, v in sd.items()}).float().eval()
    ref_sd = reference.state_dict()
    ours_sd = ours.state_dict()
    assert set(ours_sd) == set(ref_sd), set(ours_sd) ^ set(ref_sd)
    weights_diff = max(max_diff(ours_sd[k], ref_sd[k]) for k in ref_sd)

    jit = torch.jit.load(str(path), map_location="cpu").float().eval()  # our own file: safe to run here
    got = outputs(ours, images, tokens)
    allowed = tolerances(ours.config, got, ours.logit_scale.exp().item())
    result = {"load_s": load_s, "weights": weights_diff, "within": weights_diff == 0}
    for label, other in (("eager", reference), ("jit", jit)):
        want = outputs(other, images, tokens)
        for key in got:
            result[f"{label}_{key}"] = max_diff(got[key], want[key])
            result["within"] &= result[f"{label}_{key}"] <= allowed[key]
    result["allowed"] = allowed
    path.unlink()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=["ViT-B-32", "RN50"], choices=sorted(OPENAI_ARGS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            result = check(name, Path(tmp))
            failed |= not result["within"]
            allowed = ", ".join(f"{k} {v:.3g}" for k, v in result["allowed"].items())
            print(
                f"{name}: {'OK' if result['within'] else 'FAIL'} (weights exact; tolerance {allowed}; "
                f"load {result['load_s']:.1f} s)"
            )
            for key, value in result.items():
                if key not in ("load_s", "within", "allowed"):
                    print(f"  max |diff| {key:14s} {value:.3g}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
