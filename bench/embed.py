"""Embedding throughput: images/s of `clipforge embed` on the pictext shards, by decode-worker count.

    python -m bench.embed                                    # ViT-Mini-8-64 and ViT-B-32, 0, 1, 2 workers
    python -m bench.embed --models ViT-B-32 --workers 2 --int8
    python -m bench.embed --clip-retrieval-env /tmp/crenv    # also clip-retrieval's inference, same images

Models have random weights (seeded): throughput does not depend on the values. Each run embeds the whole
shard into a fresh directory (float16, batch 256, one part) and counts from the first batch to the last
part written: model loading is left out, DataLoader start-up is not. The clip-retrieval column runs
`clip-retrieval inference` (open_clip's ViT-B-32, random weights, same shard, batch and workers) in its own
environment and times the whole command, minus the time it takes to start and load the model with an
empty input; it is printed only when that environment is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench import machine

ROOT = Path(__file__).resolve().parent.parent
PICTEXT = ROOT.parent / "shared" / "data" / "pictext"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=str(PICTEXT / "train-008.tar"), help="default: pictext's last shard")
    p.add_argument("--models", nargs="+", default=["ViT-Mini-8-64", "ViT-B-32"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--int8", action="store_true", help="also the int8 inference copy")
    p.add_argument("--clip-retrieval-env", default="", help="a venv with clip-retrieval installed")
    return p.parse_args(argv)


def saved_model(arch: str, root: Path) -> str:
    """A clipforge directory of `arch` with seeded random weights and OpenAI's tokenizer."""
    from clipforge import create_model, get_tokenizer, save

    torch.manual_seed(0)
    return str(save(create_model(arch), root / arch, get_tokenizer()))


def clipforge_rate(
    model: str, shards: str, workers: int, batch: int, int8: bool, out: Path
) -> tuple[float, int]:
    from clipforge.apps.embed import EmbedConfig, embed

    shutil.rmtree(out, ignore_errors=True)
    settings = {"workers": workers, "batch_size": batch, "int8": int8, "part_size": 10**9}  # one part
    config = EmbedConfig(model=model, out=str(out), images=shards, **settings)
    result = embed(config, progress=False)
    return result.items_now / result.seconds, result.count


def clip_retrieval_rate(env: str, shards: str, workers: int, batch: int, out: Path) -> float:
    """Images/s of clip-retrieval's inference command, its start-up (an empty input) subtracted."""

    def timed(input_dataset: str) -> float:
        shutil.rmtree(out, ignore_errors=True)
        command = [
            f"{env}/bin/clip-retrieval", "inference", "--input_dataset", input_dataset,
            "--output_folder", str(out), "--input_format", "webdataset", "--enable_text", "False",
            "--enable_metadata", "False", "--clip_model", "open_clip:ViT-B-32", "--batch_size", str(batch),
            "--num_prepro_workers", str(max(workers, 1)), "--use_jit", "False",
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(
            command, check=True, capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        )
        return time.perf_counter() - start

    empty = out.parent / "empty.tar"
    subprocess.run(["tar", "cf", str(empty), "--files-from", "/dev/null"], check=True)
    images = int(subprocess.run(["tar", "tf", shards], capture_output=True, text=True).stdout.count(".jpg"))
    return images / (timed(shards) - timed(str(empty)))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not os.environ.get("CLIPFORGE_BPE_PATH") and (ROOT.parent / "shared" / "assets").is_dir():
        os.environ["CLIPFORGE_BPE_PATH"] = str(
            ROOT.parent / "shared" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
        )
    cpu = machine.cpu()
    print(
        f"{cpu['model']}, {cpu['cores']} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"load average before: {machine.load()[0]:.1f}; shard: {args.shards}\n")
    print("| model | copy | decode workers | images/s | images/s per worker |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in args.models:
            model = saved_model(arch, root)
            for int8 in [False, True] if args.int8 else [False]:
                for workers in args.workers:
                    rate, _ = clipforge_rate(model, args.shards, workers, args.batch_size, int8, root / "out")
                    per = f"{rate / workers:.0f}" if workers else "-"
                    print(
                        f"| {arch} | {'int8' if int8 else 'fp32'} | {workers} | {rate:.0f} | {per} |",
                        flush=True,
                    )
        if args.clip_retrieval_env:
            for workers in args.workers:
                rate = clip_retrieval_rate(
                    args.clip_retrieval_env, args.shards, workers, args.batch_size, root / "cr"
                )
                n = max(workers, 1)  # clip-retrieval always decodes in worker processes
                print(f"| ViT-B-32 (clip-retrieval) | fp32 | {n} | {rate:.0f} | {rate / n:.0f} |")
    print(f"\nload average after: {machine.load()[0]:.1f}")


if __name__ == "__main__":
    main()
