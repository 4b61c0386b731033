"""The machine's matmul peak (the denominator of "% of peak") and the FLOPs a model does (the numerator).

Peak: the wall-clock rate of `torch.mm` on square matrices, fp32 and bf16, measured with the same thread count
as everything else, in both environments (their torch builds may link different BLAS versions). The suite
divides by the best rate seen (any repetition, precision or environment): the fastest the machine multiplied.

FLOPs, one method for every library: `torch.utils.flop_counter.FlopCounterMode` over clipforge's model (the
same architecture as the peers', by parameter count), counting matmuls, convolutions and attention (2 FLOPs
per multiply-add); normalization, activations, softmax and the optimizer are not counted. Attention runs on
SDPA's math backend while counting, so its two batched matmuls are seen (the counter does not know the CPU's
flash kernel). Encoding: one forward on a batch of one. Training: forward, loss and backward on the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import libraries
from bench.envs import CLIPFORGE, CONTENDERS, Pool
from bench.results import Row
from bench.specs import ARCHS, make_images, make_tokens
from bench.timing import Stats, seconds_per_call

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rates(precision: str, size: int, reps: int, device: str) -> dict:
    """GFLOP/s of `size`x`size` @ `size`x`size` in `precision`, `reps` repetitions after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device, DTYPES[precision]) for _ in range(2))
    flops = 2 * size**3
    seconds_per_call(lambda: torch.mm(a, b), 2, device)
    calls = max(1, round(0.2 / seconds_per_call(lambda: torch.mm(a, b), 1, device)))
    rates = [flops / seconds_per_call(lambda: torch.mm(a, b), calls, device) / 1e9 for _ in range(reps)]
    return {"gflops": rates, "torch": torch.__version__}


def _count(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def encode_flops(arch: str, tower: str, device: str) -> float:
    """FLOPs to encode one image or one text."""
    a = ARCHS[arch]
    built = libraries.build("clipforge", a, device)
    built.model.eval()
    with torch.no_grad():
        if tower == "image":
            return _count(lambda: built.encode_image(make_images(a, 1, device)))
        return _count(lambda: built.encode_text(make_tokens(a, 1, device)))


def train_flops(arch: str, batch: int, device: str) -> float:
    """FLOPs of one training step's forward, loss and backward on `batch` pairs, per pair."""
    from bench.training import contrastive_loss

    a = ARCHS[arch]
    built = libraries.build("clipforge", a, device)
    images, tokens = make_images(a, batch, device), make_tokens(a, batch, device)

    def step() -> None:
        image_features = F.normalize(built.encode_image(images).float(), dim=-1)
        text_features = F.normalize(built.encode_text(tokens).float(), dim=-1)
        contrastive_loss(image_features, text_features, built.logit_scale()).backward()

    return _count(step) / batch


# ----------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------


def run(pool: Pool) -> list[Row]:
    """Rows "torch.mm fp32/bf16" with the rate in each environment (the best matrix size of each)."""
    s = pool.settings
    envs = (CLIPFORGE, *pool.enabled(tuple(c for c in CONTENDERS if c.key == "clipforge_peer_torch")))
    sizes = (4096, 8192) if s.device.startswith("cuda") else (1024, 2048)
    if s.scope == "quick":
        sizes = sizes[1:]
    rows = []
    for precision in DTYPES:
        results, best_size = {}, {}
        for c in envs:
            for size in sizes:
                answer = pool.run(c, "bench.peak:matmul_rates", precision=precision, size=size, reps=s.reps)
                stats = Stats.of(answer["gflops"])
                if c.key not in results or stats.median > results[c.key].median:
                    results[c.key], best_size[c.key] = stats, size
        note = ", ".join(f"{k}: n={n}" for k, n in best_size.items())
        rows.append(Row("peak", f"torch.mm {precision}", "GFLOP/s", results, precision=precision, note=note))
    return rows


def peak_gflops(rows: list[Row]) -> float:
    """The machine's peak: the best rate seen, over repetitions, precisions and environments."""
    return max(stats.high for row in rows if row.family == "peak" for stats in row.results.values())
