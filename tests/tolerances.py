"""Float tolerances derived from the arithmetic, not from one machine's readings: how far two correct
computations of a chain of matrix products may differ (any kernel, blocking, thread count or CPU)."""

from __future__ import annotations

import math

import torch

from clipforge.models import CLIPConfig

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
