"""Shared test helpers and fixtures.

Fixtures here are found by pytest; the plain functions are imported with `from conftest import ...` (pytest
puts tests/ on sys.path), so no test module imports another.

Tests that need OpenAI's BPE vocabulary carry `pytest.mark.needs_openai_bpe`: without the file they skip,
except in CI (`CI` set to a true value) or with `CLIPFORGE_REQUIRE_BPE=1`, where they fail, so a missing
file cannot turn the tokenizer's tests into silent skips.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import math
import os
import socket
import struct
import tarfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from clipforge.configs import apply_overrides
from clipforge.models import CLIPConfig
from clipforge.tokenizer import find_openai_bpe
from clipforge.train.config import TrainConfig

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
# Float tolerances from the arithmetic, not from one machine's readings
# ----------------------------------------------------------------------------------------------------


def rounding_budget(config: CLIPConfig, tower: str) -> tuple[int, int]:
    """(depth, terms) of a CLIPConfig's "image" or "text" tower: the longest chain of matrix products from
    input to features, and the most terms any of them sums (a projection's fan-in, an MLP's hidden width,
    attention's token count, a convolution's kernel x channels)."""
    if tower == "text":
        t = config.text
        # Per block: q/k/v, scores, weighted sum, output, MLP in, MLP out; then the text projection.
        return 6 * t.layers + 1, max(int(t.mlp_ratio * t.width), t.context_length, t.width)
    v = config.vision
    if v.kind == "vit":
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        return 6 * v.layers + 2, max(3 * v.patch_size**2, int(v.mlp_ratio * v.width), tokens, v.width)
    # ResNet: a 3-convolution stem, 3 per bottleneck, the attention pool's 4 products; the widest sum is
    # the last stage's 3x3 convolution over 8 x width channels.
    return 3 + 3 * sum(v.layers) + 4, max(9 * 8 * v.width, 32 * v.width, (v.image_size // 32) ** 2 + 1)


def rounding_rtol(dtype: torch.dtype, depth: int, terms: int) -> float:
    """How far, relative to the largest magnitude, two correct computations of a result may differ.

    Correct implementations (any BLAS or oneDNN kernel, blocking, thread count, with or without FMA, x86
    with or without AVX-512, ARM) differ only in the order they sum in. A sum of n terms then differs by
    about sqrt(n) * eps of its magnitude: the rounding errors have either sign and add like a random walk
    (n * eps is the never-approached worst case). The differences of a chain of `depth` products add up.
    A real bug (a wrong head count, scale, mask or activation) moves results by percents: orders of
    magnitude more.
    """
    return torch.finfo(dtype).eps * math.sqrt(terms) * depth


def rounding_tolerance(reference: torch.Tensor, depth: int, terms: int) -> float:
    """`rounding_rtol` as an absolute tolerance for `reference`: relative to its largest magnitude, since
    an element near zero is the sum of terms as large as the others."""
    return rounding_rtol(reference.dtype, depth, terms) * reference.abs().max().item()


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


# ----------------------------------------------------------------------------------------------------
# Tar files: the one writer every test uses
# ----------------------------------------------------------------------------------------------------

Member = bytes | str | dict | list | tarfile.TarInfo


def write_tar(
    path: Path,
    members: Mapping[str, Member] | Iterable[tuple[str, Member]],
    format: int = tarfile.DEFAULT_FORMAT,
    pax_headers: dict[str, str] | None = None,
) -> Path:
    """A tar of `members` in order: name -> bytes, str (UTF-8) or a dict/list (JSON). A `TarInfo` value is
    added as it is, without data (folders, links). `format` is one of tarfile's *_FORMAT constants;
    `pax_headers` go into a global header (pax format)."""
    items = members.items() if isinstance(members, Mapping) else members
    with tarfile.open(path, "w", format=format, pax_headers=pax_headers) as tar:
        for name, value in items:
            if isinstance(value, tarfile.TarInfo):
                tar.addfile(value)
                continue
            data = json.dumps(value).encode() if isinstance(value, dict | list) else value
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A webdataset shard: each sample maps an extension to its member (see `write_tar`), plus "__key__"."""
    members = [
        (f"{sample['__key__']}.{ext}", value)
        for sample in samples
        for ext, value in sample.items()
        if ext != "__key__"
    ]
    return write_tar(path, members)


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples, key -> {extension: bytes}, sorted by key: what `write_shard` wrote."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return dict(sorted(samples.items()))


def read_shards(paths: Iterable[Path]) -> dict[str, dict[str, bytes]]:
    """The samples of several shards, merged: `read_shard` over each."""
    return {key: sample for path in paths for key, sample in read_shard(path).items()}


# A pictext-like corpus: emoji in two styles, with skin-tone variants, one emoji outside the classes and
# one clip-art image, over two shards (the benchmarks that split pictext read this layout).
PICTEXT_CLASSES = [f"emoji {i}" for i in range(40)]


def _pictext_sample(key: str, caption: str = "a caption", **meta) -> dict:
    return {"__key__": key, "png": b"\x89PNG", "txt": caption.encode(), "json": json.dumps(meta).encode()}


def fake_pictext(root: Path) -> Path:
    samples = []
    for i, label in enumerate(PICTEXT_CLASSES):
        for style in ("google", "openmoji"):
            meta = {"source": "emoji", "style": style, "label": label}
            samples.append(_pictext_sample(f"emoji-{style}-{i}", f"{label}\n{style}", skin=None, **meta))
            samples.append(_pictext_sample(f"emoji-{style}-{i}-dark", label, skin=5, **meta))
    samples.append(
        _pictext_sample("emoji-openmoji-x", source="emoji", style="openmoji", label="not a class", skin=None)
    )
    samples.append(_pictext_sample("openclipart-1", "a tree", source="openclipart", path="a/b.png"))
    root.mkdir()
    write_shard(root / "train-000.tar", samples[: len(samples) // 2])
    write_shard(root / "train-001.tar", samples[len(samples) // 2 :])
    (root / "classes-emoji.json").write_text(json.dumps(PICTEXT_CLASSES))
    return root


# ----------------------------------------------------------------------------------------------------
# Labelled evaluation data
# ----------------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def random_image(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> Image.Image:
    """An image of `mode` and `size` with random pixels (and a random palette for P/PA)."""
    w, h = size
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode == "I;16":
        return Image.frombytes(mode, size, rng.integers(0, 65536, (h, w)).astype("<u2").tobytes())
    if mode == "I":
        return Image.frombytes(mode, size, rng.integers(-9, 300, (h, w)).astype("<i4").tobytes())
    if mode == "F":
        return Image.frombytes(mode, size, (rng.random((h, w)) * 300).astype("<f4").tobytes())
    bands = {"P": 1, "LA": 2, "PA": 2}.get(mode, len(mode))
    image = Image.frombytes(mode, size, rng.integers(0, 256, (h, w, bands), dtype=np.uint8).tobytes())
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


def random_images(count: int, seed: int = 1) -> list[Image.Image]:
    """`count` seeded images cycling through odd sizes and the modes a photo collection holds."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (30, 40), (1, 50), (64, 64), (13, 9), (90, 20)]
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
    return [random_image(rng, modes[i % len(modes)], sizes[i % len(sizes)]) for i in range(count)]


def colour_png(colour: str, size: int = 12, shade: int = 0) -> bytes:
    """A small PNG of one colour (a `shade` offset makes images of the same colour differ)."""
    r, g, b = COLOURS[colour]
    out = io.BytesIO()
    Image.new("RGB", (size, size), (r, max(0, g - shade), b)).save(out, format="PNG")
    return out.getvalue()


def labelled_samples(colours: list[str], start: int = 0) -> list[dict]:
    """Webdataset samples of coloured squares: a PNG, a JSON label and a caption each."""
    return [
        {
            "__key__": f"s{start + i:04d}",
            "png": colour_png(c, shade=i),
            "json": {"label": c},
            "txt": f"a {c} square",
        }
        for i, c in enumerate(colours)
    ]


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of `width` x `height` pixels, built without holding its pixels: a few KB
    even at 12,000 x 12,000 (the shape of a decompression bomb)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def truncated_jpeg(size: int = 24) -> bytes:
    """The first half of a JPEG: the header is whole, the image data cut off."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(out, format="JPEG")
    return out.getvalue()[: len(out.getvalue()) // 2]


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
