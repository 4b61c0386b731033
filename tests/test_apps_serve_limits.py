"""`clipforge serve` refuses bad input with a 4xx JSON error and stays healthy; its limits."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipforge.apps.serve.app import create_app
from clipforge.apps.serve.limits import Limits
from sample_files import colour_png, huge_png, truncated_jpeg
from serving import GOOD_PNG, classify

# ----------------------------------------------------------------------------------------------------
# Bad input: a 4xx JSON error saying what was wrong, and the server still healthy
# ----------------------------------------------------------------------------------------------------


def bad_requests():
    """(name, request function, expected status, a phrase the error must contain)."""

    def upload(image, name="x.png", content_type="image/png", labels="a, b", **extra):
        return lambda c: c.post(
            "/classify", files={"image": (name, image, content_type)}, data={"labels": labels, **extra}
        )

    return [
        ("bomb png", upload(huge_png(12_000, 12_000)), 413, "pixels"),
        ("text named .jpg", upload(b"hello, I am text\n" * 20, "cat.jpg", "image/jpeg"), 415, "not an image"),
        ("declared text type", upload(GOOD_PNG, "x.png", "text/plain"), 415, "content type"),
        ("truncated jpeg", upload(truncated_jpeg(64), "t.jpg", "image/jpeg"), 400, "truncated"),
        ("empty file", upload(b"", "e.png"), 400, "empty"),
        ("tiff", upload(tiff_bytes(), "t.tif", "image/tiff"), 415, "TIFF"),
        ("10,000 labels", upload(GOOD_PNG, labels=",".join(f"l{i}" for i in range(10_000))), 400, "10,000"),
        ("empty label list", upload(GOOD_PNG, labels=" , ,"), 400, "labels"),
        ("too-long label", upload(GOOD_PNG, labels="x" * 1001), 400, "1,001 characters"),
        ("template without {}", upload(GOOD_PNG, templates="a photo"), 400, "{}"),
        ("labels x templates", upload(GOOD_PNG, labels=",".join(f"l{i}" for i in range(1000)),
                                      templates="\n".join(f"{{}} {i}" for i in range(11))), 400, "prompts"),
        ("missing image", lambda c: c.post("/classify", data={"labels": "a"}, files={"x": ("x", b"1")}),
         400, "image: missing"),
        ("missing labels", lambda c: c.post("/classify", files={"image": ("x.png", GOOD_PNG, "image/png")}),
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
        three = classify(c, GOOD_PNG, "a, b, c")
        assert three.status_code == 400 and "limit of 2" in three.json()["error"]
        big = classify(c, colour_png("red", size=11), "a")  # 121 pixels
        assert big.status_code == 413 and "121 pixels" in big.json()["error"]
        heavy = classify(c, bytes(3_000), "a")
        assert heavy.status_code == 413
        assert classify(c, colour_png("red", size=10), "a").status_code == 200
    with pytest.raises(ValueError, match="max_labels"):
        Limits(max_labels=0)
