"""Retrieval ranks and metrics against a brute-force recomputation, ties and several captions included."""

import pytest
import torch

from clipforge.evaluate import retrieval
from clipforge.evaluate.retrieval import evaluate_retrieval, rank_metrics, retrieval_ranks


def brute_force_ranks(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor) -> tuple[list, list]:
    """The definitions, spelled out: 1 + the wrong items scoring at least as high as the (best) right one."""
    a = images / images.norm(dim=1, keepdim=True)
    b = texts / texts.norm(dim=1, keepdim=True)
    scores = (a.double() @ b.double().t()).float().tolist()
    owner = owner.tolist()
    n, m = len(images), len(texts)
    i2t = []
    for i in range(n):
        best = max(scores[i][j] for j in range(m) if owner[j] == i)
        i2t.append(1 + sum(scores[i][j] >= best for j in range(m) if owner[j] != i))
    t2i = [1 + sum(scores[k][j] >= scores[owner[j]][j] for k in range(n) if k != owner[j]) for j in range(m)]
    return i2t, t2i


def captions_per_image(n_images: int, generator: torch.Generator) -> torch.Tensor:
    """text_to_image for 1 to 3 captions per image, shuffled so captions of one image are not adjacent."""
    counts = torch.randint(1, 4, (n_images,), generator=generator)
    owner = torch.repeat_interleave(torch.arange(n_images), counts)
    return owner[torch.randperm(len(owner), generator=generator)]


def sign_vectors(n: int, generator: torch.Generator) -> torch.Tensor:
    """Vectors of +-1 in 16 dimensions: normalized entries are +-0.25 exactly, so every cosine is an exact
    multiple of 1/16 and ties are many and exact in any arithmetic."""
    return torch.randint(0, 2, (n, 16), generator=generator).float() * 2 - 1


def test_ranks_equal_brute_force_with_exact_ties_and_several_captions():
    g = torch.Generator().manual_seed(0)
    owner = captions_per_image(30, g)
    images, texts = sign_vectors(30, g), sign_vectors(len(owner), g)
    texts[:5] = texts[5]  # duplicate captions, as class names used as captions give
    i2t, t2i = retrieval_ranks(images, texts, owner)
    assert (i2t.tolist(), t2i.tolist()) == brute_force_ranks(images, texts, owner)


def test_ranks_equal_brute_force_on_random_embeddings():
    g = torch.Generator().manual_seed(1)
    owner = captions_per_image(40, g)
    images, texts = torch.randn(40, 24, generator=g), torch.randn(len(owner), 24, generator=g)
    i2t, t2i = retrieval_ranks(images, texts, owner)
    assert (i2t.tolist(), t2i.tolist()) == brute_force_ranks(images, texts, owner)


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1, 4), (7, 5), (64, 3), (1000, 1000)])
def test_chunked_and_unchunked_results_are_identical(query_chunk, gallery_chunk):
    g = torch.Generator().manual_seed(2)
    owner = captions_per_image(37, g)
    for images, texts in [
        (torch.randn(37, 8, generator=g), torch.randn(len(owner), 8, generator=g)),
        (sign_vectors(37, g), sign_vectors(len(owner), g)),
    ]:
        whole = evaluate_retrieval(images, texts, owner, query_chunk=10**6, gallery_chunk=10**6)
        chunked = evaluate_retrieval(
            images, texts, owner, query_chunk=query_chunk, gallery_chunk=gallery_chunk
        )
        assert chunked.as_dict() == whole.as_dict()


def test_memory_stays_within_one_chunk_of_scores(monkeypatch):
    shapes = []
    real_scores = retrieval._scores

    def recording(queries, gallery):
        shapes.append((len(queries), len(gallery)))
        return real_scores(queries, gallery)

    monkeypatch.setattr(retrieval, "_scores", recording)
    owner = torch.arange(50).repeat(2)
    retrieval_ranks(torch.randn(50, 8), torch.randn(100, 8), owner, query_chunk=6, gallery_chunk=9)
    assert shapes and max(q for q, _ in shapes) <= 6 and max(g for _, g in shapes) <= 9


def test_ties_count_against_the_model():
    # Everything scores alike: each query's right answer ranks behind every wrong one.
    owner = torch.tensor([0, 0, 1, 2])  # image 0 has two captions
    i2t, t2i = retrieval_ranks(torch.ones(3, 4), torch.ones(4, 4), owner)
    assert i2t.tolist() == [3, 4, 4]  # image 0: 2 wrong captions tie with its best; images 1, 2: 3 wrong
    assert t2i.tolist() == [3, 3, 3, 3]  # every caption: 2 wrong images tie with its own
    # A wrong item strictly below the right one does not count; one strictly above does.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.1], [1.0, 0.2]])  # both captions lean to image 0
    i2t, t2i = retrieval_ranks(images, texts, torch.tensor([0, 1]))
    assert i2t.tolist() == [1, 1]  # each image prefers its own caption, however slightly
    assert t2i.tolist() == [1, 2]  # caption 1 scores image 0 above its own


def test_rank_metrics_recall_mean_and_median():
    metrics = rank_metrics(torch.tensor([1, 2, 6, 11]), ks=(1, 5, 10))
    assert metrics == {"R@1": 0.25, "R@5": 0.5, "R@10": 0.75, "mean_rank": 5.0, "median_rank": 4.0}


def test_every_image_needs_a_caption():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_ranks(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))
