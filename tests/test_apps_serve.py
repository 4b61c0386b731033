"""`clipforge serve`'s answers (FastAPI's TestClient, in-process) and its command line."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from clipforge.apps.serve.app import create_app
from clipforge.cli import main as cli_main
from clipforge.evaluate.zeroshot import build_classifier, zeroshot_logits
from sample_files import colour_png, random_images
from serving import (
    FakeIndex,
    classify,
    direct_image_features,
    direct_text_features,
    logit_tolerance,
    png_bytes,
)
from tolerances import rounding_budget, rounding_rtol

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
# The command line
# ----------------------------------------------------------------------------------------------------


def test_cli_refuses_bad_arguments_with_a_one_line_error(tmp_path, eval_files, capsys):
    assert cli_main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().out.startswith("clipforge serve: ")
    assert cli_main(["serve", "--model", str(eval_files["model"]), "--max-labels", "0"]) == 2
    assert "max_labels" in capsys.readouterr().out
    assert cli_main(["serve", "--model", str(eval_files["model"]), "--templates", "a photo"]) == 2
    assert "{}" in capsys.readouterr().out
