"""Image and text features for evaluation, computed in batches and returned in dataset order.

Image features come from one of two places (`layer`):
- "embed": `model.encode_image`, the joint embedding space (zero-shot classification and retrieval);
- "pre-projection": what the vision tower holds just before its last linear map into that space, the
  paper's choice for linear probes (Radford et al. 2021, A.3: "the features before the linear projection
  to the embedding space"). For a ViT that is `ln_post(class token)`, before `proj`; for the ResNet it is
  the attention pool's output before its output projection `c_proj`. It is captured with a forward hook,
  so the model code is untouched and the forward pass is the usual one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from clipforge.evaluate.images import ImageDataset, ImageRef
from clipforge.transforms import EvalTransform

FEATURE_LAYERS = ("embed", "pre-projection")


@contextlib.contextmanager
def capture_pre_projection(visual: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, each forward of `visual` appends its pre-projection features to the yielded list."""
    captured: list[torch.Tensor] = []
    if hasattr(visual, "ln_post") and hasattr(visual, "proj"):  # ViT: ln_post is applied to the class token
        handle = visual.ln_post.register_forward_hook(lambda _m, _inputs, out: captured.append(out))
    elif hasattr(visual, "attnpool"):  # ResNet: the input of the attention pool's output projection
        handle = visual.attnpool.c_proj.register_forward_pre_hook(
            lambda _m, inputs: captured.append(inputs[0])
        )
    else:
        raise ValueError(f"no known projection in a {type(visual).__name__}: use layer='embed'")
    try:
        yield captured
    finally:
        handle.remove()


def image_encoder(model: nn.Module, layer: str = "embed") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function (B, 3, H, W) preprocessed images -> (B, D) float features from `layer`."""
    if layer == "embed":
        return lambda images: model.encode_image(images).float()
    if layer != "pre-projection":
        raise ValueError(f"unknown feature layer {layer!r}; choose from {FEATURE_LAYERS}")

    def encode(images: torch.Tensor) -> torch.Tensor:
        with capture_pre_projection(model.visual) as captured:
            model.encode_image(images)
        return captured[0].float()

    return encode


@torch.no_grad()
def image_features(
    model: nn.Module,
    images: Sequence[ImageRef],
    *,
    layer: str = "embed",
    batch_size: int = 256,
    workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = False,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """(N, D) float32 features of `images` (decoded in `workers` processes), on the CPU, in order.

    Images are streamed: at most a few batches are decoded at a time, whatever N. The row of an image
    that cannot be used (see `ImageDataset`; `max_pixels` as there) is NaN; `drop_undecodable` removes
    those rows and counts them."""
    encode = image_encoder(model, layer)
    dataset = ImageDataset(images, EvalTransform(model.config.vision.image_size), max_pixels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    features = torch.full((len(dataset), 0), torch.nan)  # its width is known at the first usable image
    start = 0
    for batch, ok in tqdm(loader, desc="images", unit="batch", disable=not progress, leave=False):
        if ok.any():
            encoded = encode(batch[ok].to(device)).cpu()
            if features.shape[1] == 0:
                features = torch.full((len(dataset), encoded.shape[1]), torch.nan)
            features[start : start + len(batch)][ok] = encoded
        start += len(batch)
    return features


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """(N, D) L2-normalized float32 text features, on the CPU, in order."""
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="texts", unit="batch", disable=not progress, leave=False):
        tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(chunks)
