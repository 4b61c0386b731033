"""Generate tests/fixtures/transforms/openai_transform.npz: OpenAI's real eval transform on odd inputs.

Run in the reference venv (torch + torchvision + clip-anytorch, module ``clip``), ``$CLIPFORGE_BENCH_ENV``,
built by ``bench/setup_env.sh $CLIPFORGE_BENCH_ENV`` (docs/parity.md):

    $CLIPFORGE_BENCH_ENV/bin/python scripts/make_transform_fixtures.py

It builds small seeded images in many PIL modes and awkward sizes, runs ``clip.clip._transform(n_px)``
for n_px in (24, 33) and stores, per case, the raw input (mode, size, ``tobytes()``, palette) and the
float32 outputs. tests/test_transforms.py rebuilds each image with ``Image.frombytes`` and checks that
clipforge reproduces the outputs bit for bit.

If the reference venv can import clipforge.transforms' dependencies (torch, numpy, PIL) it also
cross-checks clipforge here, under the reference torch, and compares the train transform's crop+resize
against torchvision's ``resized_crop`` for a few boxes (within 2 levels). Nothing from torchvision ends
up in clipforge.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "transforms" / "openai_transform.npz"
SIZES = (24, 33)
SEED = 20240607

# (mode, (width, height)). Sizes hit: 1-pixel-wide strips, odd sizes, images smaller than n_px, exactly
# n_px (no resize), and center-crop excesses of 1, 3, 5, 7 px at n_px = 24 (round-half-to-even offsets).
CASES: list[tuple[str, tuple[int, int]]] = [
    ("RGB", (37, 23)),
    ("RGB", (1, 500)),
    ("RGB", (24, 24)),
    ("RGB", (24, 25)),
    ("RGB", (27, 24)),
    ("L", (500, 1)),
    ("L", (29, 24)),
    ("P", (23, 37)),
    ("RGBA", (31, 24)),
    ("LA", (10, 7)),
    ("CMYK", (33, 33)),
    ("I;16", (41, 19)),
    ("1", (7, 10)),
    ("I", (19, 26)),
    ("F", (26, 19)),
    ("YCbCr", (64, 27)),
    ("PA", (3, 3)),
    ("RGB", (100, 61)),
]


def make_image(
    rng: np.random.Generator, mode: str, size: tuple[int, int]
) -> tuple[Image.Image, bytes | None]:
    """A random image of ``mode``/``size``: smooth gradients plus noise, alpha with fully clear pixels."""
    w, h = size
    bands = {"1": 1, "L": 1, "P": 1, "I;16": 1, "I": 1, "F": 1, "LA": 2, "PA": 2}.get(mode, len(mode))
    if mode == "1":
        data = np.packbits(rng.integers(0, 2, (h, w), dtype=np.uint8), axis=1).tobytes()
    elif mode == "I;16":
        data = rng.integers(0, 65536, (h, w), dtype=np.uint16).astype("<u2").tobytes()
    elif mode == "I":
        data = rng.integers(-50, 400, (h, w), dtype=np.int32).astype("<i4").tobytes()
    elif mode == "F":
        data = (rng.random((h, w)) * 320.0 - 20.0).astype("<f4").tobytes()
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        base = (xx * 255 // max(w - 1, 1) + yy * 128 // max(h - 1, 1))[:, :, None]
        noise = rng.integers(-60, 61, (h, w, bands))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        if mode in ("RGBA", "LA", "PA"):
            alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
            alpha[rng.random((h, w)) < 0.2] = 0
            alpha[rng.random((h, w)) < 0.2] = 255
            arr[:, :, -1] = alpha
        data = arr.tobytes()
    image = Image.frombytes(mode, size, data)
    palette = None
    if mode in ("P", "PA"):
        palette = rng.integers(0, 256, 768, dtype=np.uint8).tobytes()
        image.putpalette(palette)
    return image, palette


def _load_clipforge_transforms():
    package = ROOT / "src" / "clipforge" / "transforms"
    spec = importlib.util.spec_from_file_location(
        "_cf_transforms", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def reference_outputs(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[Image.Image]]:
    """The fixture arrays: every case's image and OpenAI's `_transform(n)` output for each size."""
    import clip.clip  # the reference: OpenAI's _transform (torchvision Compose)
    import torchvision

    arrays: dict[str, np.ndarray] = {
        "versions": np.array(
            f"torch {torch.__version__}; torchvision {torchvision.__version__}; "
            f"pillow {PIL.__version__}; numpy {np.__version__}"
        ),
        "sizes": np.array(SIZES, dtype=np.int64),
        "num_cases": np.array(len(CASES), dtype=np.int64),
    }
    references = {n: clip.clip._transform(n) for n in SIZES}
    images = []
    for i, (mode, size) in enumerate(CASES):
        image, palette = make_image(rng, mode, size)
        images.append(image)
        arrays[f"case{i}_mode"] = np.array(mode)
        arrays[f"case{i}_size"] = np.array(size, dtype=np.int64)
        arrays[f"case{i}_data"] = np.frombuffer(image.tobytes(), dtype=np.uint8)
        if palette is not None:
            arrays[f"case{i}_palette"] = np.frombuffer(palette, dtype=np.uint8)
        for n in SIZES:
            out = references[n](image)
            assert out.dtype == torch.float32 and out.shape == (3, n, n), (mode, size, out.shape)
            arrays[f"case{i}_out{n}"] = out.numpy()
    return arrays, images


def check_eval(cf: Any, images: list[Image.Image], arrays: dict[str, np.ndarray]) -> bool:
    """clipforge's eval transform against the reference outputs: True if every case is bit-exact."""
    exact, worst = 0, 0.0
    for i, image in enumerate(images):
        for n in SIZES:
            ours = cf.EvalTransform(n)(image)
            ref = torch.from_numpy(arrays[f"case{i}_out{n}"])
            worst = max(worst, float((ours - ref).abs().max()))
            exact += bool(torch.equal(ours, ref))
    total = len(images) * len(SIZES)
    print(f"clipforge eval vs OpenAI (reference torch): {exact}/{total} bit-exact, max |diff| {worst:g}")
    return exact == total


def check_train(cf: Any, images: list[Image.Image]) -> bool:
    """For a given box, clipforge's crop -> RGB -> resize -> tensor -> normalize should be within 2 levels
    of torchvision's resized_crop followed by OpenAI's tail (what OpenCLIP's train transform does).

    Not bit-exact for RGB and L images: clipforge resizes those with torch's uint8 bicubic kernel, which
    rounds differently from PIL's. Other modes go through PIL's resize, as in torchvision.
    """
    import clip.clip
    import torchvision.transforms.functional as TF

    tail = clip.clip._transform(16).transforms[2:]
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    total = 0
    for image in images:
        for _ in range(3):
            left, top, cw, ch = cf.sample_crop_box(image.width, image.height, (0.9, 1.0), (3 / 4, 4 / 3), gen)
            ref = TF.resized_crop(image, top, left, ch, cw, [16, 16], TF.InterpolationMode.BICUBIC)
            for t in tail:
                ref = t(ref)
            t = cf.TrainTransform(16, seed=1)
            t.crop_box = lambda w, h, key=None, box=(left, top, cw, ch): box  # pin the box
            std = torch.tensor(cf.OPENAI_STD).view(3, 1, 1)
            diff = float(((t(image) - ref).abs() * std * 255).max())
            worst = max(worst, diff)
            total += 1
    print(
        f"clipforge train crop+resize vs torchvision resized_crop: max |diff| {worst:.2f} levels ("
        f"({total} crops)"
    )
    return worst <= 2.0 + 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    arrays, images = reference_outputs(np.random.default_rng(SEED))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB, {len(CASES)} cases x {SIZES})")
    print(arrays["versions"])
    cf = _load_clipforge_transforms()
    if not (check_eval(cf, images, arrays) & check_train(cf, images)):  # &: run and report both
        sys.exit(1)


if __name__ == "__main__":
    main()
