"""Data pipeline throughput per DataLoader worker (one process, one torch thread), on real JPEGs.

clipforge: `build_train_loader` on one pictext shard with `workers=0`, as the pictext recipe configures it
(webdataset source, shuffle buffer 2000, `TrainTransform`: random resized crop with scale 0.9-1.0, bicubic;
captions tokenized to 32 tokens): shard reading (its own ustar reader), JPEG decode (libjpeg-turbo through
simplejpeg, the same pixels as PIL's), augment (crop, torch's uint8 bicubic resize), tokenize, collate.

OpenCLIP: what its webdataset training pipeline does per sample, with the tar read in order by `tarfile`
(no shuffle buffer): PIL decode and RGB conversion (webdataset's "pilrgb"), then
`open_clip.image_transform(size, is_train=True)` (torchvision RandomResizedCrop 0.9-1.0, bicubic, ToTensor,
Normalize), captions through OpenCLIP's `SimpleTokenizer`, `torch.stack` per batch.

Both streams are endless (epoch after epoch over the shard) and measured in their steady state: a repetition
draws the next batches of a stream that is already running. clipforge's epochs each start by filling the
shuffle buffer (the 2,000 samples of the shard, undecoded); that cost falls in whichever repetition crosses an
epoch boundary (every ~15 batches), as it would in training.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench.envs import CLIPFORGE, CONTENDERS, ROOT, Pool
from bench.results import Row

SHARD = ROOT.parent / "shared" / "data" / "pictext" / "train-000.tar"
CONTEXT = 32  # the pictext recipe's context length


def clipforge_batches(shard: str, image_size: int, batch: int) -> Callable[[], Iterator]:
    from clipforge.data import DataConfig, build_train_loader
    from clipforge.tokenizer import get_tokenizer

    cfg = DataConfig(
        source="webdataset",
        path=shard,
        batch_size=batch,
        context_length=CONTEXT,
        workers=0,
        shuffle_buffer=2000,
    )
    data = build_train_loader(cfg, get_tokenizer(), image_size, seed=0)
    return lambda: data.batches(0)


def openclip_batches(shard: str, image_size: int, batch: int) -> Callable[[], Iterator]:
    import open_clip
    from PIL import Image

    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)

    def samples() -> Iterator[tuple[bytes, str]]:
        """(jpg, caption) in tar order; the files of a sample are adjacent, as webdataset requires."""
        with tarfile.open(shard) as tar:
            key, files = None, {}
            for member in tar:
                stem, _, ext = member.name.rpartition(".")
                if stem != key and files:
                    yield files["jpg"], files["txt"].decode("utf-8")
                    files = {}
                key = stem
                if ext in ("jpg", "txt"):
                    files[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:  # epoch after epoch
            images, captions = [], []
            for jpg, caption in samples():
                images.append(preprocess(Image.open(io.BytesIO(jpg)).convert("RGB")))
                captions.append(caption)
                if len(images) == batch:
                    yield torch.stack(images), tokenizer(captions)
                    images, captions = [], []

    return batches


def make_case(
    lib: str, shard: str, image_size: int, batch: int, batches: int, device: str
) -> tuple[Callable[[], object], dict]:
    """Worker side: a callable that draws the next `batches` batches of a running stream."""
    stream = (clipforge_batches if lib == "clipforge" else openclip_batches)(shard, image_size, batch)
    iterator = stream()

    def call() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker process
        try:
            for _ in range(batches):
                next(iterator)
        finally:
            torch.set_num_threads(threads)

    return call, {"items": batch * batches}


# ----------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------


def run(pool: Pool, shard: Path = SHARD) -> list[Row]:
    if not shard.exists():
        raise FileNotFoundError(f"no pictext shard at {shard} (the data pipeline is measured on it)")
    s = pool.settings
    pool.stop_workers()  # fresh processes: workers that held big models run this several times slower
    openclip = next(c for c in CONTENDERS if c.key == "openclip")
    batches = 1  # a call draws one batch; a repetition repeats calls for at least `rep_s`
    rows = []
    for image_size in (64,) if s.scope == "quick" else (64, 224):
        args = {"shard": str(shard), "image_size": image_size, "batch": 128, "batches": batches}
        measured = pool.measure(
            (CLIPFORGE, openclip), "bench.pipeline:make_case", lambda c, a=args: {"lib": c.lib, **a}
        )
        results = {k: m.seconds.map(lambda t, n=m.info["items"]: n / t) for k, m in measured.items()}
        case = f"{shard.name} -> {image_size}px train batches of 128"
        rows.append(Row("data", case, "images/s", results, note="steady state of a running stream"))
        print(rows[-1].brief(), flush=True)
    return rows
