"""`clipforge serve`'s batch queue: concurrent requests batched, failures confined to their request."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from clipforge.apps.serve.app import create_app
from clipforge.apps.serve.batching import BatchQueue
from clipforge.evaluate.zeroshot import build_classifier, zeroshot_logits
from sample_files import random_images
from serving import (
    GOOD_PNG,
    classify,
    direct_image_features,
    direct_text_features,
    logit_tolerance,
    png_bytes,
)
from tolerances import rounding_budget, rounding_rtol

# ----------------------------------------------------------------------------------------------------
# Concurrency and failures: one queue, batched, never stopped by an error
# ----------------------------------------------------------------------------------------------------


def test_concurrent_requests_are_answered_correctly_in_fewer_model_calls(served):
    model, tokenizer, index = served
    # A long wait makes the batching certain on a loaded machine: the requests arrive within it.
    app = create_app(model, tokenizer, index=index, max_wait=0.5, max_batch=64)
    images = [png_bytes(im.convert("RGB")) for im in random_images(8, seed=5)]
    labels = ["red", "green", "blue"]
    queries = ["a red square", "a green square", "a blue square", "a square"]
    start = threading.Barrier(len(images) + len(queries))

    with TestClient(app) as c:

        def one_classify(image):
            start.wait()
            return classify(c, image, ",".join(labels), "a {} square").json()

        def one_search(q):
            start.wait()
            return c.get("/search", params={"q": q, "k": 3}).json()

        with ThreadPoolExecutor(len(images) + len(queries)) as pool:
            classifying = [pool.submit(one_classify, image) for image in images]
            searching = [pool.submit(one_search, q) for q in queries]
            classified = [f.result(timeout=60) for f in classifying]
            searched = [f.result(timeout=60) for f in searching]
        stats = app.state.server.queue.stats()

    requests = len(images) + len(queries)
    assert stats["model_calls"] < requests and stats["largest_call"] > 1
    classifier = build_classifier(model, tokenizer, labels, ["a {} square"])
    tol = logit_tolerance(model.config)
    for image, answer in zip(images, classified, strict=True):
        logits = zeroshot_logits(direct_image_features(model, image), classifier)[0]
        got = {item["label"]: item["logit"] for item in answer["labels"]}
        assert all(abs(got[label] - logits[i].item()) <= tol for i, label in enumerate(labels))
    text_tol = 2 * math.sqrt(64) * rounding_rtol(torch.float32, *rounding_budget(model.config, "text"))
    for q, answer in zip(queries, searched, strict=True):
        expected = index.vectors @ direct_text_features(model, tokenizer, q).numpy()[0]
        assert all(abs(r["score"] - expected[r["id"]]) <= text_tol for r in answer["results"])


def test_a_model_failure_fails_that_request_alone(served):
    model, tokenizer, _ = served
    app = create_app(model, tokenizer)
    queue = app.state.server.queue
    encode = queue.encoders["image"]
    failing = {"left": 1}

    def flaky(images):
        if failing["left"]:
            failing["left"] -= 1
            raise RuntimeError("out of memory (simulated)")
        return encode(images)

    queue.encoders["image"] = flaky
    with TestClient(app) as c:
        first = classify(c, GOOD_PNG, "a, b")
        assert first.status_code == 500 and "out of memory (simulated)" in first.json()["error"]
        assert c.get("/healthz").status_code == 200
        assert classify(c, GOOD_PNG, "a, b").status_code == 200


def test_batch_queue_retries_a_failed_batch_job_by_job():
    def encoder(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x * 2

    queue = BatchQueue({"v": encoder}, max_batch=8, max_wait=0.5)
    futures = [queue.submit("v", torch.full((1, 2), float(v))) for v in (1, -1, 3)]
    assert torch.equal(futures[0].result(timeout=10), torch.full((1, 2), 2.0))
    with pytest.raises(ValueError, match="negative"):
        futures[1].result(timeout=10)
    assert torch.equal(futures[2].result(timeout=10), torch.full((1, 2), 6.0))
    assert torch.equal(queue.run("v", torch.ones(1, 2)), torch.full((1, 2), 2.0))  # still working
    stats = queue.stats()
    assert stats["failed_jobs"] == 1 and stats["jobs"] == 4
    queue.close()
    with pytest.raises(RuntimeError, match="closed"):
        queue.submit("v", torch.ones(1, 2))


def test_batch_queue_splits_at_max_batch_and_can_run_unbatched():
    calls: list[int] = []

    def encoder(x):
        calls.append(len(x))
        return x + 1

    queue = BatchQueue({"v": encoder}, max_batch=4, max_wait=0.5)
    futures = [queue.submit("v", torch.arange(3.0)[:, None] + 10 * i) for i in range(3)]
    for i, future in enumerate(futures):
        assert torch.equal(future.result(timeout=10), torch.arange(3.0)[:, None] + 10 * i + 1)
    # Gathering stops once max_batch rows wait: jobs 1 and 2 (6 rows) as calls of 4 and 2, then job 3.
    assert calls == [4, 2, 3]
    queue.close()

    calls.clear()
    unbatched = BatchQueue({"v": encoder}, max_batch=4, batching=False)
    futures = [unbatched.submit("v", torch.zeros(2, 1)) for _ in range(3)]
    assert all(torch.equal(f.result(timeout=10), torch.ones(2, 1)) for f in futures)
    assert calls == [2, 2, 2] and unbatched.stats()["model_calls"] == 3
    unbatched.close()
