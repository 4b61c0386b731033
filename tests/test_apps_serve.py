"""`clipforge serve`'s API (FastAPI's TestClient, in-process), its batching queue and its limits."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.apps.serve.app import create_app
from clipforge.apps.serve.batching import BatchQueue
from clipforge.apps.serve.limits import Limits
from clipforge.cli import main as cli_main
from clipforge.evaluate.zeroshot import build_classifier, zeroshot_logits
from clipforge.transforms import EvalTransform
from sample_files import colour_png, huge_png, random_images, truncated_jpeg
from tolerances import rounding_budget, rounding_rtol

# ----------------------------------------------------------------------------------------------------
# A model, a search index with the SearchIndex interface, and the direct computations to compare with
# ----------------------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def served(eval_files):
    model, _, tokenizer = clipforge.load(eval_files["model"])
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((10, model.config.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    colours = ["red", "green", "blue"]
    images = [colour_png(colours[i % 3], size=200, shade=i) for i in range(9)] + [b"not an image"]
    return model, tokenizer, FakeIndex(vectors, images)


@pytest.fixture(scope="module")
def client(served):
    model, tokenizer, index = served
    app = create_app(model, tokenizer, index=index, name="tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


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


# ----------------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------------


def test_healthz_and_page(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["dim"] == 64
    assert health["index"] == {"count": 10, "model": "fake", "dim": 64}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/classify" in page.text and "/search" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_classify_equals_direct_zeroshot(client, served):
    model, tokenizer, _ = served
    image = png_bytes(random_images(1, seed=3)[0].convert("RGB"))
    labels, templates = ["red", "green", "blue"], ["a {} square", "a photo of {}"]
    response = classify(client, image, ", ".join(labels), "\n".join(templates))
    assert response.status_code == 200, response.text
    got = {item["label"]: item for item in response.json()["labels"]}

    classifier = build_classifier(model, tokenizer, labels, templates)
    logits = zeroshot_logits(direct_image_features(model, image), classifier)[0]
    probs = logits.softmax(dim=-1)
    tol = logit_tolerance(model.config)
    for i, label in enumerate(labels):
        assert abs(got[label]["logit"] - logits[i].item()) <= tol
        # softmax's Jacobian has rows of absolute sum <= 1/2: probabilities move half as far as logits
        assert abs(got[label]["probability"] - probs[i].item()) <= tol / 2
    served_probs = [item["probability"] for item in response.json()["labels"]]
    assert served_probs == sorted(served_probs, reverse=True)
    assert sum(served_probs) == pytest.approx(1.0, abs=1e-5)


def test_classify_labels_repeated_or_comma_separated_and_default_templates(client, served):
    model, tokenizer, _ = served
    image = colour_png("green", size=40)
    repeated = client.post(
        "/classify", files={"image": ("g.png", image, "image/png")}, data={"labels": ["red", "green"]}
    ).json()
    joined = classify(client, image, "red, green,, red").json()  # blanks and duplicates dropped
    assert repeated == joined
    assert joined["templates"] == ["a photo of a {}."]
    classifier = build_classifier(model, tokenizer, ["red", "green"], ["a photo of a {}."])
    logits = zeroshot_logits(direct_image_features(model, image), classifier)[0]
    got = {item["label"]: item["logit"] for item in joined["labels"]}
    assert abs(got["red"] - logits[0].item()) <= logit_tolerance(model.config)


def test_embed_image_and_text(client, served):
    model, tokenizer, _ = served
    image = colour_png("blue", size=50)
    got = client.post("/embed", files={"image": ("b.png", image, "image/png")}).json()
    assert got["kind"] == "image" and got["dim"] == 64
    vector = torch.tensor(got["embedding"])
    assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    tol = 2 * rounding_rtol(torch.float32, *rounding_budget(model.config, "image"))
    assert torch.allclose(vector, direct_image_features(model, image)[0], atol=tol, rtol=0)

    text = client.post("/embed", data={"text": "a red square"}).json()  # a plain urlencoded form
    tol = 2 * rounding_rtol(torch.float32, *rounding_budget(model.config, "text"))
    expected = direct_text_features(model, tokenizer, "a red square")[0]
    assert text["kind"] == "text" and torch.allclose(torch.tensor(text["embedding"]), expected, atol=tol)


def check_results(results, query: torch.Tensor, index: FakeIndex, k: int, tol: float) -> None:
    """The results are the index's top k for `query` (computed directly), with JPEG thumbnails."""
    expected = index.vectors @ query.numpy()[0]
    order = np.argsort(-expected)[:k]
    gaps = -np.diff(expected[np.argsort(-expected)][: k + 1])
    assert (gaps > 2 * tol).all()  # no near-ties: the order cannot depend on rounding
    assert [r["id"] for r in results] == order.tolist()
    for r in results:
        assert abs(r["score"] - expected[r["id"]]) <= tol
        if r["id"] == 9:  # the collection's unreadable file: no thumbnail, the request still answered
            assert r["thumb"] is None
            continue
        assert r["thumb"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(r["thumb"].split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 160


def test_search_by_text_and_by_image(client, served):
    model, tokenizer, index = served
    text_tol = 2 * math.sqrt(64) * rounding_rtol(torch.float32, *rounding_budget(model.config, "text"))
    body = client.get("/search", params={"q": "a blue square", "k": 10}).json()
    assert body["query"] == "a blue square"
    check_results(
        body["results"], direct_text_features(model, tokenizer, "a blue square"), index, 10, text_tol
    )

    image = colour_png("red", size=64)
    image_tol = 2 * math.sqrt(64) * rounding_rtol(torch.float32, *rounding_budget(model.config, "image"))
    response = client.post("/search", files={"image": ("r.png", image, "image/png")}, data={"k": "4"})
    check_results(response.json()["results"], direct_image_features(model, image), index, 4, image_tol)


def test_search_without_an_index_is_a_404(served):
    model, tokenizer, _ = served
    with TestClient(create_app(model, tokenizer)) as c:
        response = c.get("/search", params={"q": "anything"})
        assert response.status_code == 404 and "--index" in response.json()["error"]
        assert c.get("/healthz").json()["index"] is None
        assert c.app.state.server.queue.stats()["model_calls"] == 0  # refused before encoding


def test_an_index_of_another_dimension_is_refused(served):
    model, tokenizer, _ = served
    with pytest.raises(ValueError, match="32-d embeddings"):
        create_app(model, tokenizer, index=FakeIndex(np.zeros((2, 32), np.float32), [None, None]))


# ----------------------------------------------------------------------------------------------------
# Bad input: a 4xx JSON error saying what was wrong, and the server still healthy
# ----------------------------------------------------------------------------------------------------

GOOD = colour_png("red", size=20)


def bad_requests():
    """(name, request function, expected status, a phrase the error must contain)."""

    def upload(image, name="x.png", content_type="image/png", labels="a, b", **extra):
        return lambda c: c.post(
            "/classify", files={"image": (name, image, content_type)}, data={"labels": labels, **extra}
        )

    return [
        ("bomb png", upload(huge_png(12_000, 12_000)), 413, "pixels"),
        ("text named .jpg", upload(b"hello, I am text\n" * 20, "cat.jpg", "image/jpeg"), 415, "not an image"),
        ("declared text type", upload(GOOD, "x.png", "text/plain"), 415, "content type"),
        ("truncated jpeg", upload(truncated_jpeg(64), "t.jpg", "image/jpeg"), 400, "truncated"),
        ("empty file", upload(b"", "e.png"), 400, "empty"),
        ("tiff", upload(tiff_bytes(), "t.tif", "image/tiff"), 415, "TIFF"),
        ("10,000 labels", upload(GOOD, labels=",".join(f"l{i}" for i in range(10_000))), 400, "10,000"),
        ("empty label list", upload(GOOD, labels=" , ,"), 400, "labels"),
        ("too-long label", upload(GOOD, labels="x" * 1001), 400, "1,001 characters"),
        ("template without {}", upload(GOOD, templates="a photo"), 400, "{}"),
        ("labels x templates", upload(GOOD, labels=",".join(f"l{i}" for i in range(1000)),
                                      templates="\n".join(f"{{}} {i}" for i in range(11))), 400, "prompts"),
        ("missing image", lambda c: c.post("/classify", data={"labels": "a"}, files={"x": ("x", b"1")}),
         400, "image: missing"),
        ("missing labels", lambda c: c.post("/classify", files={"image": ("x.png", GOOD, "image/png")}),
         400, "labels: none"),
        ("image as text field", lambda c: c.post("/classify", data={"image": "abc", "labels": "a"},
                                                 files={"x": ("x", b"1")}), 400, "expected a file"),
        ("not multipart", lambda c: c.post("/classify", json={"labels": "a"}), 415, "multipart"),
        ("search: no q", lambda c: c.get("/search"), 400, "q: missing"),
        ("search: long q", lambda c: c.get("/search", params={"q": "w" * 5000}), 400, "5,000 characters"),
        ("search: k too big", lambda c: c.get("/search", params={"q": "a", "k": 101}), 400, "1..100"),
        ("search: k not int", lambda c: c.get("/search", params={"q": "a", "k": "ten"}), 400, "integer"),
        ("embed: neither", lambda c: c.post("/embed", data={"other": "x"}), 400, "exactly one"),
        ("embed: long text", lambda c: c.post("/embed", data={"text": "t" * 1001}), 400, "characters"),
        ("unknown route", lambda c: c.get("/nope"), 404, "Not Found"),
    ]  # fmt: skip


def tiff_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="TIFF")
    return out.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, for the bomb
@pytest.mark.parametrize(
    ("request_fn", "status", "phrase"),
    [case[1:] for case in bad_requests()],
    ids=[case[0] for case in bad_requests()],
)
def test_bad_input_is_a_4xx_json_error(client, request_fn, status, phrase):
    calls_before = client.app.state.server.queue.stats()["model_calls"]
    response = request_fn(client)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert phrase in response.json()["error"]
    assert client.app.state.server.queue.stats()["model_calls"] == calls_before  # refused before the model
    assert client.get("/healthz").status_code == 200


def multipart_chunks(total: int, chunk: int, boundary: str = "xyzzy"):
    """A multipart body with a `total`-byte image, `chunk` bytes at a time (never held whole)."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\na, b\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    for _ in range(total // chunk):
        yield bytes(chunk)
    yield f"\r\n--{boundary}--\r\n".encode()


def asgi_post(app, path: str, headers: dict[str, str], chunks) -> tuple[int, dict, int]:
    """POST `chunks` to the ASGI app as a server does, one receive() per chunk: (status, JSON body, bytes
    the app asked for). TestClient cannot show this: it reads a streamed request body whole first."""
    consumed = 0

    async def receive() -> dict:
        nonlocal consumed
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), consumed


MULTIPART = {"content-type": "multipart/form-data; boundary=xyzzy"}


def test_a_60mb_upload_is_refused_while_it_streams(client):
    chunks = multipart_chunks(60_000_000, 1_000_000)
    status, body, consumed = asgi_post(client.app, "/classify", MULTIPART, chunks)
    assert status == 413 and "upload limit of 16,777,216 bytes" in body["error"]
    assert consumed <= 16_777_216 + 1_000_000  # stopped at the limit, far from the 60 MB
    assert client.get("/healthz").status_code == 200


def test_a_declared_length_over_the_limit_is_refused_unread(client):
    headers = {**MULTIPART, "content-length": "60000000"}
    status, body, consumed = asgi_post(client.app, "/classify", headers, multipart_chunks(60_000_000, 10**6))
    assert status == 413 and "upload limit" in body["error"]
    assert consumed == 0


def test_an_upload_under_the_limit_streams_through(client):
    """The counting passes a body under the limit untouched: the same parser sees the same bytes."""
    image = colour_png("blue", size=30)
    parts = [
        b'--xyzzy\r\nContent-Disposition: form-data; name="labels"\r\n\r\nred, blue\r\n',
        b'--xyzzy\r\nContent-Disposition: form-data; name="image"; filename="b.png"\r\n',
        b"Content-Type: image/png\r\n\r\n",
        image[:50],
        image[50:],
        b"\r\n--xyzzy--\r\n",
    ]
    status, body, consumed = asgi_post(client.app, "/classify", MULTIPART, iter(parts))
    assert status == 200 and consumed == sum(map(len, parts))
    assert body == classify(client, image, "red, blue").json()


def test_limits_are_configurable(served):
    model, tokenizer, _ = served
    limits = Limits(max_labels=2, max_upload_bytes=2_000, max_pixels=100)
    with TestClient(create_app(model, tokenizer, limits=limits)) as c:
        three = classify(c, GOOD, "a, b, c")
        assert three.status_code == 400 and "limit of 2" in three.json()["error"]
        big = classify(c, colour_png("red", size=11), "a")  # 121 pixels
        assert big.status_code == 413 and "121 pixels" in big.json()["error"]
        heavy = classify(c, bytes(3_000), "a")
        assert heavy.status_code == 413
        assert classify(c, colour_png("red", size=10), "a").status_code == 200
    with pytest.raises(ValueError, match="max_labels"):
        Limits(max_labels=0)


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
        first = classify(c, GOOD, "a, b")
        assert first.status_code == 500 and "out of memory (simulated)" in first.json()["error"]
        assert c.get("/healthz").status_code == 200
        assert classify(c, GOOD, "a, b").status_code == 200


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


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------


def test_cli_refuses_bad_arguments_with_a_one_line_error(tmp_path, eval_files, capsys):
    assert cli_main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().out.startswith("clipforge serve: ")
    assert cli_main(["serve", "--model", str(eval_files["model"]), "--max-labels", "0"]) == 2
    assert "max_labels" in capsys.readouterr().out
    assert cli_main(["serve", "--model", str(eval_files["model"]), "--templates", "a photo"]) == 2
    assert "{}" in capsys.readouterr().out
