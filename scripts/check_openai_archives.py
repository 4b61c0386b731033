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

    PYTHONPATH=src $CLIPFORGE_REFENV/bin/python scripts/check_openai_archives.py [ViT-B-32 RN50 ...]

`$CLIPFORGE_REFENV` is the reference environment, built by `bench/setup_env.sh $CLIPFORGE_REFENV`
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
TOLERANCE = 1e-5


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
    result = {"load_s": load_s, "weights": weights_diff}
    for label, other in (("eager", reference), ("jit", jit)):
        want = outputs(other, images, tokens)
        for key in got:
            result[f"{label}_{key}"] = max_diff(got[key], want[key])
    result["feature_scale"] = max(got["image"].abs().max().item(), got["text"].abs().max().item())
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
            diffs = {k: v for k, v in result.items() if k not in ("load_s", "feature_scale")}
            ok = all(v <= TOLERANCE for v in diffs.values()) and result["weights"] == 0
            failed |= not ok
            print(
                f"{name}: {'OK' if ok else 'FAIL'} (tolerance {TOLERANCE}, load {result['load_s']:.1f} s, "
                f"largest feature {result['feature_scale']:.3g})"
            )
            for key, value in diffs.items():
                print(f"  max |diff| {key:14s} {value:.3g}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
