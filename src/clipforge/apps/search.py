"""Search an index with a text or an image: encode the query with the index's model, then ask the index.

`QueryEncoder` loads the model once and turns texts and images into L2-normalized float32 vectors the
way `clipforge embed` turned the collection into them (the same inference copy, int8 when the
collection was embedded in int8, OpenAI's exact eval transform, the same pixel limit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.apps.index import Hit, SearchIndex
from clipforge.transforms import EvalTransform, ImageSource


class QueryEncoder:
    """A model ready to encode queries: `.texts([...])` and `.images([...])` give (Q, dim) float32 rows."""

    def __init__(
        self, model: str, int8: bool = False, device: str = "cpu", max_image_pixels: int | None = None
    ) -> None:
        from clipforge.checkpoints import load
        from clipforge.models import for_inference, quantize_int8

        loaded, _, self.tokenizer = load(model, device=device)
        self.model = quantize_int8(loaded) if int8 else for_inference(loaded)
        self.name, self.device, self.max_image_pixels = model, device, max_image_pixels
        self.transform = EvalTransform(self.model.config.vision.image_size)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @torch.inference_mode()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts), context_length=self.model.context_length, truncate=True)
        return _normalized(self.model.encode_text(tokens.to(self.device)))

    @torch.inference_mode()
    def images(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Paths or encoded bytes; ValueError naming the image when one cannot be used."""
        batch = []
        for i, source in enumerate(images):
            name = os.fspath(source) if isinstance(source, str | os.PathLike) else f"image {i}"
            try:
                batch.append(self.transform(self.transform.load(source, self.max_image_pixels)))
            except FileNotFoundError:
                raise ValueError(f"{name}: no such file") from None
            except Exception as e:  # PIL raises many types for a file that is not a usable image
                raise ValueError(f"{name}: not a usable image ({type(e).__name__}: {e})") from None
        return _normalized(self.model.encode_image(torch.stack(batch).to(self.device)))


def _normalized(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def encoder_for(index: SearchIndex, model: str = "", device: str = "cpu") -> QueryEncoder:
    """The encoder for `index`: its own model (or `model`), checked to give vectors of the index's size."""
    encoder = QueryEncoder(model or index.model, int8=bool(index.meta.get("int8")), device=device)
    if encoder.dim != index.dim:
        raise ValueError(
            f"model {encoder.name!r} gives {encoder.dim}-d vectors; the index {index.path} holds "
            f"{index.dim}-d vectors (of {index.model!r})"
        )
    return encoder


def search(
    index: SearchIndex,
    encoder: QueryEncoder,
    *,
    text: str | None = None,
    image: ImageSource | None = None,
    k: int = 10,
) -> list[Hit]:
    """The `k` best hits for one query: a text or an image (a path or encoded bytes)."""
    if (text is None) == (image is None):
        raise ValueError("give exactly one query: a text or an image")
    query = encoder.texts([text]) if text is not None else encoder.images([image])  # type: ignore[list-item]
    return index.search(query, k)[0]
