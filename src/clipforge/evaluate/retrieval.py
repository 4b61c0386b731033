"""Image-text retrieval: Recall@K, mean and median rank, in both directions, in bounded memory.

Every image has one or more captions; `text_to_image[j]` is the image caption j belongs to. The score of
a pair is the cosine similarity of their features.

- text -> image: each caption is a query; the gallery is every image; its image is the one right answer.
- image -> text: each image is a query; the gallery is every caption; any of its own captions is right,
  and the rank is that of its best-scoring caption (the first right answer in the sorted list).

The rank of the right answer is 1 + the number of wrong gallery items scoring at least as high:
ties count against the model (pessimistic), so a model that scores everything alike ranks last, never
first. Recall@K is the share of queries with rank <= K; the median rank of an even count is the mean of
the middle two.

Scores are computed in float64 and rounded to float32, so identical features (duplicate captions, the
same image twice) tie exactly whatever the chunking. The work is done chunk by chunk, counting the wrong
items at or above each query's threshold, so memory is `query_chunk x gallery_chunk` whatever the size
of the set: no N x M matrix is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 5, 10)


@dataclass
class RetrievalResult:
    image_to_text: dict[str, float]  # R@K for each K, mean_rank, median_rank
    text_to_image: dict[str, float]
    n_images: int
    n_texts: int

    def as_dict(self) -> dict:
        flat = {f"i2t_{k}": v for k, v in self.image_to_text.items()}
        flat.update({f"t2i_{k}": v for k, v in self.text_to_image.items()})
        return {**flat, "n_images": self.n_images, "n_texts": self.n_texts}


def _scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return (queries.double() @ gallery.double().t()).float()


def _pair_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum(dim=-1).float()


def count_at_or_above(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    thresholds: torch.Tensor,
    query_group: torch.Tensor,
    gallery_group: torch.Tensor,
    query_chunk: int = 1024,
    gallery_chunk: int = 8192,
) -> torch.Tensor:
    """For each query q: how many gallery items g with group[g] != group[q] score >= thresholds[q]."""
    counts = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    for q0 in range(0, len(queries), query_chunk):
        q = slice(q0, q0 + query_chunk)
        for g0 in range(0, len(gallery), gallery_chunk):
            g = slice(g0, g0 + gallery_chunk)
            scores = _scores(queries[q], gallery[g])
            scores[query_group[q, None] == gallery_group[None, g]] = -torch.inf  # right answers compete not
            counts[q] += (scores >= thresholds[q, None]).sum(dim=1)
    return counts


def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    query_chunk: int = 1024,
    gallery_chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image -> text rank of each image, text -> image rank of each caption), 1-based, ties pessimistic."""
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    owner = text_to_image.to(device=images.device, dtype=torch.long)
    n_images = len(images)
    if torch.bincount(owner, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption (text_to_image misses some images)")
    image_ids = torch.arange(n_images, device=images.device)
    chunks = {"query_chunk": query_chunk, "gallery_chunk": gallery_chunk}

    true_pair = _pair_scores(texts, images[owner])  # each caption with its own image
    t2i = 1 + count_at_or_above(texts, images, true_pair, owner, image_ids, **chunks)
    best_caption = torch.full((n_images,), -torch.inf, device=images.device)
    best_caption.scatter_reduce_(0, owner, true_pair, reduce="amax")
    i2t = 1 + count_at_or_above(images, texts, best_caption, image_ids, owner, **chunks)
    return i2t.cpu(), t2i.cpu()


def rank_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """{"R@K": share of ranks <= K, ..., "mean_rank", "median_rank"} of 1-based ranks."""
    metrics = {f"R@{k}": (ranks <= k).double().mean().item() for k in ks}
    metrics["mean_rank"] = ranks.double().mean().item()
    metrics["median_rank"] = float(np.median(ranks.numpy()))
    return metrics


def evaluate_retrieval(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    query_chunk: int = 1024,
    gallery_chunk: int = 8192,
) -> RetrievalResult:
    """Both directions' Recall@K and ranks; see the module docstring for the exact definitions."""
    i2t, t2i = retrieval_ranks(image_features, text_features, text_to_image, query_chunk, gallery_chunk)
    return RetrievalResult(
        rank_metrics(i2t, ks), rank_metrics(t2i, ks), len(image_features), len(text_features)
    )
