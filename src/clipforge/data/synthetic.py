"""A built-in image-caption dataset drawn on the fly: coloured shapes, with captions that describe them.

Every picture shows one to three copies of one shape in one colour, small or large, placed on the left,
right, top, bottom, in the middle or anywhere, on a plain or lightly noisy light background. Its caption
says what is there in one of several sentence forms ("two small red circles on the left", "a picture of
a large blue star in the middle", "three green triangles", ...). Sample ``i`` depends only on
(``seed``, ``i``): no download, no storage, the same pixels in every process.

Composition test: of the 8 x 8 colour-shape pairs, the 8 on a Latin-square diagonal (`HELDOUT`) never
appear in training, yet every colour and every shape still appears with seven partners. Zero-shot
classification of held-out pairs among all 64 (`synthetic_zeroshot_set`) then asks whether the model
composes "red" and "circle" rather than memorising "red circle".

Drawing is PIL ImageDraw at twice the target size, box-filtered down (cheap antialiasing); a few
thousand 64 px pictures per second per core.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from clipforge.data.samples import RawSample, derive_seed
from clipforge.transforms import EvalTransform

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (40, 155, 55),
    "blue": (35, 75, 215),
    "purple": (135, 55, 175),
    "pink": (240, 125, 185),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring")

# Held out of training: colour i with shape i (red circle, orange square, ..., black ring). One pair per
# row and per column of the colour x shape table, so each colour and each shape keeps 7 training pairs.
HELDOUT: frozenset[tuple[str, str]] = frozenset(zip(COLOURS, SHAPES, strict=True))

# Zero-shot classes: every "colour shape" pair; class index = colour index * len(SHAPES) + shape index.
CLASSNAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
HELDOUT_CLASSES: tuple[int, ...] = tuple(
    i for i, name in enumerate(CLASSNAMES) if tuple(name.split()) in HELDOUT
)

# Prompts for zero-shot classification, worded like the training captions ("one" avoids "a orange").
TEMPLATES: tuple[str, ...] = ("one {}", "a picture of one {}", "a drawing of one {}", "there is one {}")

# Region of each position as (left, top, right, bottom) fractions of the picture; None = anywhere.
REGIONS: dict[str | None, tuple[float, float, float, float]] = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "middle": (0.2, 0.2, 0.8, 0.8),
    None: (0.0, 0.0, 1.0, 1.0),
}
PLACES: dict[str, tuple[str, ...]] = {  # how a caption may say each position
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "middle": ("in the middle", "in the centre"),
}
RADII = {"small": (0.10, 0.13), "large": (0.19, 0.24)}  # shape radius range, as a fraction of the side
COUNT_WORDS = {2: "two", 3: "three"}

_SUPERSAMPLE = 2  # draw at 2x, then box-filter down: antialiased edges for little cost
_NOISE = 10  # +- amplitude of the optional background noise, in 8-bit levels


@dataclass(frozen=True)
class Scene:
    """What one picture shows; its caption and pixels are both made from it."""

    colour: str
    shape: str
    size: str  # "small" or "large"
    count: int  # 1, 2 or 3 (several copies are always small)
    position: str | None  # a key of REGIONS; None = spread over the whole picture


def training_pairs(holdout: bool = True) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs the training split draws from: all 64, or the 56 not in HELDOUT."""
    return tuple((c, s) for c in COLOURS for s in SHAPES if not (holdout and (c, s) in HELDOUT))


def sample_scene(rng: random.Random, pairs: tuple[tuple[str, str], ...]) -> Scene:
    """Draw a scene: a uniform pair from ``pairs``, then count, size and position."""
    colour, shape = rng.choice(pairs)
    count = rng.choice((1, 1, 2, 3))
    size = rng.choice(("small", "large")) if count == 1 else "small"
    # Three copies do not fit in the middle region at a readable size; two and one fit everywhere.
    positions = [p for p in REGIONS if not (count == 3 and p == "middle")]
    return Scene(colour, shape, size, count, rng.choice(positions))


# ----------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------


def describe(scene: Scene, rng: random.Random) -> str:
    """A caption that names the colour and shape, and usually the count, size and position."""
    words = []
    if scene.count == 1:
        words.append(rng.choice(("a", "a", "one")))
    else:
        words.append(COUNT_WORDS[scene.count])
    if rng.random() < 0.6:
        words.append(scene.size)
    words.append(scene.colour)
    words.append(_plural(scene.shape) if scene.count > 1 else scene.shape)
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    thing = " ".join(words)
    place = rng.choice(PLACES[scene.position]) if scene.position in PLACES else ""
    verb = "is" if scene.count == 1 else "are"
    forms = [
        f"{thing} {place}",
        f"a picture of {thing} {place}",
        f"a drawing of {thing} {place}",
        f"there {verb} {thing} {place}",
        f"{place}, {thing}" if place else thing,
        f"{thing} on a light background",
    ]
    return " ".join(rng.choice(forms).split()).strip(", ")


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------


def render(scene: Scene, rng: random.Random, image_size: int) -> Image.Image:
    """Draw ``scene`` as an ``image_size`` x ``image_size`` RGB picture, every choice taken from ``rng``."""
    side = image_size * _SUPERSAMPLE
    grey = rng.randint(190, 235)
    background = tuple(grey + rng.randint(-8, 8) for _ in range(3))  # light grey, faintly tinted
    canvas = Image.new("RGB", (side, side), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(canvas)
    fill = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLOURS[scene.colour])
    for cx, cy, radius in _layout(scene, rng, side):
        _draw_shape(draw, scene.shape, cx, cy, radius, rng.uniform(-12.0, 12.0), fill)
    image = canvas.reduce(_SUPERSAMPLE)
    if rng.random() < 0.5:
        image = _add_noise(image, rng)
    return image


def _layout(scene: Scene, rng: random.Random, side: int) -> list[tuple[float, float, float]]:
    """Centres and radius of each copy: the region is cut into ``count`` cells along its long axis."""
    left, top, right, bottom = (f * side for f in REGIONS[scene.position])
    width, height = right - left, bottom - top
    horizontal = width > height or (width == height and rng.random() < 0.5)
    cell_w = width / scene.count if horizontal else width
    cell_h = height if horizontal else height / scene.count
    lo, hi = RADII[scene.size]
    margin = 0.03 * side
    radius = min(rng.uniform(lo, hi) * side, min(cell_w, cell_h) / 2 - margin)
    spots = []
    for k in range(scene.count):
        x0 = left + (k * cell_w if horizontal else 0.0)
        y0 = top + (0.0 if horizontal else k * cell_h)
        cx = rng.uniform(x0 + margin + radius, x0 + cell_w - margin - radius)
        cy = rng.uniform(y0 + margin + radius, y0 + cell_h - margin - radius)
        spots.append((cx, cy, radius))
    return spots


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    tilt: float,
    fill: tuple[int, ...],
) -> None:
    """One filled shape of radius ``r`` at (cx, cy); ``tilt`` degrees applies to shapes that look tilted."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.38 * r)))
    else:
        points = _OUTLINES[shape]
        angle = 0.0 if shape in ("square", "diamond") else math.radians(tilt)  # tilted, they would swap
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon(
            [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points], fill=fill
        )


def _regular(n: int, radius: float = 1.0, phase: float = -90.0) -> list[tuple[float, float]]:
    step = 360.0 / n
    return [
        (radius * math.cos(math.radians(phase + k * step)), radius * math.sin(math.radians(phase + k * step)))
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    outer, inside = _regular(points), _regular(points, inner, -90.0 + 180.0 / points)
    return [p for pair in zip(outer, inside, strict=True) for p in pair]


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    points = [(-arm, -1.0), (arm, -1.0), (arm, -arm)]  # the top arm and the corner after it
    for _ in range(3):
        points += [(-y, x) for x, y in points[-3:]]  # a quarter turn gives the next arm
    return points


# Unit outlines (radius 1, y pointing down); the triangle is moved so its centroid sits at the centre.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "diamond": [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)],
    "triangle": [(x, y + 0.15) for x, y in _regular(3, 1.1)],
    "hexagon": _regular(6, 1.0, 0.0),
    "star": _star(),
    "cross": _cross(),
}


@functools.cache
def _noise_tile(size: int) -> np.ndarray:
    """A fixed grey-noise tile, twice the picture's side: a picture adds a random window of it."""
    rng = np.random.default_rng(derive_seed("synthetic-noise", size))
    return rng.integers(-_NOISE, _NOISE + 1, size=(2 * size, 2 * size, 1), dtype=np.int16)


def _add_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    size = image.width
    tile = _noise_tile(size)
    dx, dy = rng.randrange(size), rng.randrange(size)
    pixels = np.asarray(image, dtype=np.int16) + tile[dy : dy + size, dx : dx + size]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------
# The training source and the zero-shot evaluation set
# ----------------------------------------------------------------------------------------------------


class SyntheticSource:
    """Map-style source: ``source[i]`` is picture ``i`` and its caption, drawn on demand.

    ``seed`` (``data.synthetic_seed``) fixes what picture ``i`` is; the training seed only orders them.
    """

    def __init__(self, image_size: int, samples: int, seed: int = 0, holdout: bool = True) -> None:
        self.image_size = image_size
        self.samples = samples
        self.seed = seed
        self.pairs = training_pairs(holdout)

    def __len__(self) -> int:
        return self.samples

    def scene(self, index: int) -> tuple[Scene, random.Random]:
        """Scene ``index`` and the generator, positioned for its caption and drawing."""
        if not 0 <= index < self.samples:
            raise IndexError(f"synthetic sample {index} is out of range(0, {self.samples})")
        rng = random.Random(derive_seed(self.seed, "synthetic", index))
        return sample_scene(rng, self.pairs), rng

    def __getitem__(self, index: int) -> RawSample:
        scene, rng = self.scene(index)
        caption = describe(scene, rng)
        return RawSample(image=render(scene, rng, self.image_size), caption=caption, key=str(index))

    def __repr__(self) -> str:
        return f"SyntheticSource(image_size={self.image_size}, samples={self.samples}, seed={self.seed})"


class ZeroShotSet(NamedTuple):
    images: torch.Tensor  # [N, 3, S, S], normalised like every eval image (OpenAI mean and std)
    labels: torch.Tensor  # [N] int64 indices into classnames
    classnames: tuple[str, ...]  # all 64 "colour shape" names (CLASSNAMES)


def synthetic_zeroshot_set(
    n_per_class: int = 20,
    image_size: int = 64,
    *,
    seed: int = 0,
    split: str = "heldout",
) -> ZeroShotSet:
    """Pictures for zero-shot classification among all 64 "colour shape" classes (use `TEMPLATES`).

    ``split``: "heldout" draws only the 8 pairs never seen in training (the composition test), "seen"
    the other 56, "all" every pair. Scenes vary in count, size and position as in training, but come
    from a separate random stream, so none is a training picture.
    """
    classes = {"heldout": HELDOUT_CLASSES, "all": tuple(range(len(CLASSNAMES)))}.get(split)
    if split == "seen":
        classes = tuple(i for i in range(len(CLASSNAMES)) if i not in HELDOUT_CLASSES)
    if classes is None:
        raise ValueError(f"split must be 'heldout', 'seen' or 'all', got {split!r}")
    transform = EvalTransform(image_size)
    images, labels = [], []
    for label in classes:
        pair = tuple(CLASSNAMES[label].split())
        for i in range(n_per_class):
            rng = random.Random(derive_seed(seed, "synthetic-zeroshot", label, i))
            scene = sample_scene(rng, (pair,))  # type: ignore[arg-type]
            images.append(transform(render(scene, rng, image_size)))
            labels.append(label)
    return ZeroShotSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), CLASSNAMES)
