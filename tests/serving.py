"""Helpers for the serve tests: a search index with known vectors, and the direct computations the
served answers are compared with."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.transforms import EvalTransform
from sample_files import colour_png
from tolerances import rounding_budget, rounding_rtol

# ----------------------------------------------------------------------------------------------------
# A model, a search index with the SearchIndex interface, and the direct computations to compare with
# ----------------------------------------------------------------------------------------------------


GOOD_PNG = colour_png("red", size=20)  # an upload every route accepts


@dataclass
class Hit:
    id: int
    score: float
    path: str
    caption: str


class FakeIndex:
    """`clipforge.apps.index.SearchIndex`'s interface over known vectors: exact inner-product search."""

    def __init__(self, vectors: np.ndarray, images: list[bytes | None], model: str = "fake") -> None:
        self.vectors, self.images, self.model = vectors, images, model
        self.dim, self.count = vectors.shape[1], len(vectors)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        assert queries.dtype == np.float32 and queries.shape[1] == self.dim
        scores = queries @ self.vectors.T  # (Q, N)
        out = []
        for row in scores:
            order = np.argsort(-row)[:k]
            out.append([Hit(int(i), float(row[i]), f"img/{i}.png", f"picture {i}") for i in order])
        return out

    def image_bytes(self, hit: Hit) -> bytes | None:
        return self.images[hit.id]


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def direct_image_features(model, image_bytes: bytes) -> torch.Tensor:
    transform = EvalTransform(model.config.vision.image_size)
    with torch.no_grad():
        x = transform(Image.open(io.BytesIO(image_bytes)))[None]
        return F.normalize(model.encode_image(x).float(), dim=-1)


def direct_text_features(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer([text])).float(), dim=-1)


def logit_tolerance(config) -> float:
    """How far the served zero-shot logits may be from the direct ones when the batch composition differs.

    Each unnormalized feature element may differ by `rounding_rtol` of the largest element; after L2
    normalization that is at most 2 rtol per element, so at most 2 sqrt(D) rtol in L2 norm, and the
    template mean + renormalization of the classifier at most doubles the text side's. A logit is
    100 x a dot product of unit vectors, so it moves by at most 100 x (the two vectors' L2 errors)."""
    image = rounding_rtol(torch.float32, *rounding_budget(config, "image"))
    text = rounding_rtol(torch.float32, *rounding_budget(config, "text"))
    return 100 * 2 * math.sqrt(config.embed_dim) * (image + 2 * text)


def classify(client, image: bytes, labels, templates=None, name="x.png", content_type="image/png"):
    data = {"labels": labels}
    if templates is not None:
        data["templates"] = templates
    return client.post("/classify", files={"image": (name, image, content_type)}, data=data)
