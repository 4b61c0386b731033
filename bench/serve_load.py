"""`clipforge serve` under load, with and without request batching, side by side in one run.

    python -m bench.serve_load                                   # the make-demo model if present
    python -m bench.serve_load --model ViT-B-32-random --requests 400 --concurrency 16

Builds a small collection (pictures of the built-in synthetic set with their captions), embeds and indexes
it, then for each setting starts `clipforge serve` on 127.0.0.1 in a subprocess and sends `--requests`
requests, `--concurrency` at a time, half POST /classify (a picture, 8 labels) and half GET /search (a
caption). Prints a markdown table: errors, latency p50/p95 and throughput per setting.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import machine

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "runs" / "quickstart" / "step-00000300"
LABELS = ", ".join(
    [
        *("red circle", "blue square", "green triangle", "yellow star"),
        *("orange diamond", "purple circle", "red square", "blue star"),
    ]
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default="",
        help="a model clipforge.load takes (default: the make-demo model, "
        "else a randomly initialized ViT-Nano-8-64); NAME-random: a random model of that name",
    )
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--images", type=int, default=64, help="pictures in the indexed collection")
    return p.parse_args(argv)


def prepare(model: str, root: Path, n_images: int) -> tuple[str, Path, list[tuple[bytes, str]]]:
    """(the model path, an index over n synthetic pictures, the pictures as PNG bytes with captions)."""
    import clipforge
    from clipforge.apps.embed import EmbedConfig, embed
    from clipforge.apps.index import build_index
    from clipforge.data.synthetic import SyntheticSource

    if not model or model.endswith("-random"):
        if not model and DEMO.exists():
            model = str(DEMO)
        else:
            name = model.removesuffix("-random") or "ViT-Nano-8-64"
            model = str(root / "model")
            clipforge.save(clipforge.create_model(name), model, clipforge.get_tokenizer(None))
    size = clipforge.load(model)[0].config.vision.image_size
    source = SyntheticSource(image_size=size, samples=n_images, seed=1)
    folder = root / "images"
    folder.mkdir()
    pictures = []
    for i in range(n_images):
        sample = source[i]
        out = io.BytesIO()
        sample.image.save(out, format="PNG")
        (folder / f"{i:04d}.png").write_bytes(out.getvalue())
        (folder / f"{i:04d}.txt").write_text(sample.caption)
        pictures.append((out.getvalue(), sample.caption))
    embed(EmbedConfig(model=model, out=str(root / "emb"), images=str(folder), workers=0), progress=False)
    build_index(root / "emb", root / "index", log=lambda _line: None)
    return model, root / "index", pictures


async def load_test(url: str, pictures, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            image, caption = pictures[i % len(pictures)]
            start = time.perf_counter()
            if i % 2:
                files = {"image": ("p.png", image, "image/png")}
                response = await client.post("/classify", files=files, data={"labels": LABELS})
            else:
                response = await client.get("/search", params={"q": caption, "k": 12})
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await client.get("/search", params={"q": "warm-up"})  # the first calls pay one-off costs
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        calls = (await client.get("/healthz")).json()["queue"]["model_calls"]
    latencies.sort()
    return {
        "errors": errors,
        "p50": statistics.median(latencies) * 1000,
        "p95": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
        "rps": requests / wall,
        "calls": calls,
    }


def serve(model: str, index: Path, port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "clipforge", "serve", "--model", model, "--index", str(index)]
    return subprocess.Popen([*command, "--port", str(port), "--log-level", "error", *extra])


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not start")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import socket

    with tempfile.TemporaryDirectory() as tmp:
        model, index, pictures = prepare(args.model, Path(tmp), args.images)
        rows = []
        for label, extra in (("batched (default)", []), ("--no-batching", ["--no-batching"])):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            process = serve(model, index, port, extra)
            try:
                wait_ready(url, process)
                rows.append((label, asyncio.run(load_test(url, pictures, args.requests, args.concurrency))))
            finally:
                process.terminate()
                process.wait(timeout=30)
    cpu = machine.cpu()
    print(f"{args.requests} requests, {args.concurrency} concurrent, half classify (8 labels), half search")
    print(f"model {model}; {cpu['model']}, {cpu['cores']} cores; load {machine.load()[0]:.1f}\n")
    print("| server | errors | p50 ms | p95 ms | requests/s | model calls |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(
            f"| {label} | {r['errors']} | {r['p50']:.0f} | {r['p95']:.0f} | {r['rps']:.1f} | {r['calls']} |"
        )


if __name__ == "__main__":
    main()
