"""Shared test helpers and fixtures.

Fixtures here are found by pytest. Plain helpers are imported by name: `from conftest import ...` for
those here, `from tolerances import ...` for float tolerances and `from sample_files import ...` for the
shards and images tests build (pytest puts tests/ on sys.path), so no test module imports another.

Tests that need OpenAI's BPE vocabulary carry `pytest.mark.needs_openai_bpe`: without the file they skip,
except in CI (`CI` set to a true value) or with `CLIPFORGE_REQUIRE_BPE=1`, where they fail, so a missing
file cannot turn the tokenizer's tests into silent skips.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import clipforge
from clipforge.configs import apply_overrides
from clipforge.models import CLIPConfig
from clipforge.tokenizer import find_openai_bpe
from clipforge.train.config import TrainConfig
from sample_files import COLOURS, colour_png, labelled_samples, write_shard
from serving import FakeIndex

# ----------------------------------------------------------------------------------------------------
# OpenAI's vocabulary: skip without it locally, fail without it in CI
# ----------------------------------------------------------------------------------------------------


def bpe_required() -> bool:
    """Whether a missing OpenAI vocabulary is a failure (CI, or asked for) rather than a skip."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("CLIPFORGE_REQUIRE_BPE", "") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_openai_bpe: needs bpe_simple_vocab_16e6.txt.gz (skips locally, fails in CI)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Runs before the test's fixtures, so a fixture that hides the file from a test does not count.
    if item.get_closest_marker("needs_openai_bpe") is None or find_openai_bpe() is not None:
        return
    message = (
        "OpenAI's bpe_simple_vocab_16e6.txt.gz not found: set CLIPFORGE_BPE_PATH or put it in "
        "~/.cache/clipforge (see docs/tokenizer.md)"
    )
    if bpe_required():
        pytest.fail(message + " [required: CI or CLIPFORGE_REQUIRE_BPE=1]", pytrace=False)
    pytest.skip(message)


# ----------------------------------------------------------------------------------------------------
# Tokenizers that need no vocabulary file
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomized_model(name: str | CLIPConfig, seed: int = 0, layernorms: bool = False) -> torch.nn.Module:
    """A seeded model (a registered name or a config) in eval mode whose BatchNorms are not the identity: a
    fresh ResNet's last BatchNorm of each block is zero, which zeroes every residual branch and would hide
    errors in the convolutions. `layernorms`: the LayerNorms' gains and biases too, so that a swapped
    weight and bias would show."""
    from clipforge.models import create_model

    torch.manual_seed(seed)
    model = create_model(name).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.2, 0.2)
    for norm in (m for m in model.modules() if layernorms and isinstance(m, torch.nn.LayerNorm)):
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return model


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine's cores are not lost to spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stub_tokenizer(texts: list[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Bytes as token ids: enough for the data pipeline, needs no vocabulary file, and reversible."""
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = list(text.encode())[:context_length]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def captions_of(tokens: torch.Tensor) -> list[str]:
    """The texts back from `stub_tokenizer` ids."""
    return [bytes(row[row > 0].tolist()).decode() for row in tokens]


def word_tokenizer(texts: list[str]) -> torch.Tensor:
    """Deterministic ids per word in a 16-token context, SOT first and EOT (the largest id) last, as a
    CLIP text tower expects; no vocabulary file needed."""
    out = torch.zeros(len(texts), 16, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [49406, *[sum(map(ord, w)) % 49000 + 1 for w in text.split()][:14], 49407]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> dict[str, Path]:
    """A saved ViT-Micro with a tiny trained tokenizer, labelled train/eval shards and a class file."""
    from clipforge import create_model, save
    from clipforge.tokenizer import train_tokenizer

    names = list(COLOURS)
    root = tmp_path_factory.mktemp("eval")
    (root / "captions.txt").write_text("\n".join(f"a {c} square" for c in names * 10))
    tokenizer = train_tokenizer([root / "captions.txt"], vocab_size=600)
    torch.manual_seed(0)
    save(create_model("ViT-Micro-16-32"), root / "model", tokenizer)
    write_shard(root / "train.tar", labelled_samples(names * 6))
    write_shard(root / "eval.tar", labelled_samples(names * 3, start=100))
    (root / "classes.json").write_text(json.dumps(names))
    return {
        "root": root,
        "model": root / "model",
        "train": root / "train.tar",
        "eval": root / "eval.tar",
        "classes": root / "classes.json",
    }


def write_suite(
    path: Path, files: dict[str, Path], out_dir: Path, cache_dir: Path, probe: bool = True
) -> Path:
    """A suite file over `eval_files`: zero-shot, retrieval and (with `probe`) a linear probe."""
    probe_task = f"""
[[task]]
kind = "linear-probe"
train = "{files["train"]}"
data = "{files["eval"]}"
"""
    path.write_text(
        f"""
model = "{files["model"]}"
out_dir = "{out_dir}"
cache_dir = "{cache_dir}"
workers = 0
batch_size = 4

[[task]]
kind = "zeroshot"
name = "colours"
data = "{files["eval"]}"
classes = "{files["classes"]}"
templates = "a {{}} square"

[[task]]
kind = "retrieval"
data = "{files["eval"]}"
"""
        + (probe_task if probe else "")
    )
    return path


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 600-id vocabulary trained on synthetic captions: the trained-tokenizer path, and small embeddings."""
    from clipforge.data.synthetic import SyntheticSource
    from clipforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    source = SyntheticSource(image_size=32, samples=400, seed=0)
    (root / "captions.txt").write_text("\n".join(source[i].caption for i in range(len(source))))
    train_tokenizer([root / "captions.txt"], vocab_size=600).save(root / "tokenizer")
    return root / "tokenizer"


def tiny_config(out_dir: Path, tokenizer_dir: Path, *extra: str) -> TrainConfig:
    """A ViT-Micro run on 64 synthetic samples: 8 steps of 32, checkpoints every 4, one thread."""
    args = [
        "--model.name", "ViT-Micro-16-32", "--model.tokenizer", str(tokenizer_dir),
        "--data.batch_size", "32", "--data.context_length", "16", "--data.synthetic_samples", "64",
        "--optim.lr", "5e-4", "--schedule.steps", "8", "--schedule.warmup_steps", "2",
        "--eval.every", "-1", "--run.out_dir", str(out_dir), "--run.threads", "1", "--run.log_every", "1",
        "--run.progress", "false", "--run.checkpoint_every", "4", "--run.keep_checkpoints", "5",
    ]  # fmt: skip
    return apply_overrides(TrainConfig(), [*args, *extra])


# ----------------------------------------------------------------------------------------------------
# Several processes: gloo on 127.0.0.1, bounded in time
# ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(target, count: int, args: tuple, timeout: float) -> None:
    """Run `target(rank, *args)` in `count` spawned processes and wait for all; fail if any fails or they
    are not done within `timeout` seconds together (the stragglers are killed, never left behind)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(count)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * count, f"worker exit codes {codes}: a process failed or ran past {timeout} s"


# A recipe of the smallest model on synthetic data, two steps, for the tests of `clipforge train`'s checks.
MICRO_RECIPE = """
[model]
name = "ViT-Micro-16-32"
[data]
batch_size = 4
context_length = 16
synthetic_samples = 16
[schedule]
steps = 2
warmup_steps = 1
[eval]
every = -1
[run]
progress = false
threads = 1
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path) -> Iterator[tuple[str, Path, http.server.ThreadingHTTPServer]]:
    """(base URL, served directory, the server) of an HTTP server on 127.0.0.1, shut down after the test:
    downloads are tested against it, since no model hub is reachable from the tests."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root)
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------------
# The serve API over a saved ViT-Micro and a search index with known vectors
# ----------------------------------------------------------------------------------------------------


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
    from fastapi.testclient import TestClient  # the apps extra: only the serve tests need it

    from clipforge.apps.serve.app import create_app

    model, tokenizer, index = served
    app = create_app(model, tokenizer, index=index, name="tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
