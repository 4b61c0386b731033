"""Image and text encoding throughput: `encode_image` / `encode_text` in eval mode under `inference_mode`.

Every library builds the same architecture with random weights (`bench.libraries`) and encodes the same
inputs: random pixels, and full-length texts (77 tokens: CLIP's text tower always runs its whole context).
clipforge encodes with its inference copy (`clipforge.for_inference`, what `clipforge eval` uses: BatchNorms
folded into the convolutions, a channels-last ResNet, QuickGELU folded into the MLPs; the same function up to
float rounding); the peers with their modules as built. bf16 means autocast with fp32 weights, as a training
run's evaluation would use it; int8 is clipforge's opt-in int8 inference copy (`clipforge.models.int8`: int8
linear layers, everything else fp32; on a CPU without a fast int8 matmul it keeps fp32 layers, and the note
says so). A ResNet's image tower is convolutions, which stay fp32, so int8 is measured on ViT-B/32 only.
For both, the note gives the smallest cosine similarity between the outputs and the same library's fp32
outputs on the same inputs; with random weights, which lack the outlier activations of trained CLIP models,
so on released weights int8 may agree less. RN50's text tower is
ViT-B/32's (same widths and depths; only the final projection differs: 512 -> 1024 instead of 512 -> 512),
so text is measured once, on ViT-B/32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import libraries
from bench.envs import CLIPFORGE, CONTENDERS, PEERS, Contender, Pool
from bench.results import Row
from bench.specs import ARCHS, make_images, make_tokens

# bf16 on a CPU: clipforge and the maintained libraries (OpenAI's model under autocast runs the same PyTorch
# ops as OpenCLIP's); on a GPU every contender.
MAINTAINED = (CLIPFORGE, *(c for c in PEERS if c.lib != "openai"))


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def make_case(
    lib: str, arch: str, tower: str, batch: int, precision: str, device: str
) -> tuple[Callable[[], object], dict]:
    """Worker side: a callable that encodes one batch (the model is shared by the cases of one arch)."""
    a = ARCHS[arch]
    built = libraries.cached(lib, a, device, int8=precision == "int8")
    built.model.eval()
    inputs = make_images(a, batch, device) if tower == "image" else make_tokens(a, batch, device)

    def encode(built: libraries.Built, precision: str) -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, device):
            return (built.encode_image if tower == "image" else built.encode_text)(inputs)

    info = {"items": batch, **libraries.describe(built)}
    if precision == "int8":
        from clipforge.models.int8 import fast_int8_matmul

        info["int8_kept_fp32"] = not fast_int8_matmul()
    if precision != "fp32":
        fp32 = encode(libraries.cached(lib, a, device), "fp32").float()
        info["cosine_to_fp32"] = float(F.cosine_similarity(encode(built, precision).float(), fp32).min())
    return lambda: encode(built, precision), info


# ----------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    arch: str
    tower: str
    batch: int
    precision: str
    contenders: tuple[Contender, ...]

    @property
    def case(self) -> str:
        return f"{self.arch} {self.tower}, batch {self.batch}"


def plan(device: str, scope: str) -> list[Cell]:
    """The cells of a run: `scope` is "quick", "default" or "complete"."""
    if device.startswith("cuda"):
        shapes = [("ViT-B-32", "image"), ("ViT-B-32", "text"), ("ViT-L-14", "image"), ("ViT-L-14", "text")]
        return [
            Cell(arch, tower, batch, precision, CONTENDERS)
            for arch, tower in shapes
            for batch in (1, 256)
            for precision in ("bf16", "fp32")
        ]
    cells = []
    for arch, tower in (("ViT-B-32", "image"), ("ViT-B-32", "text"), ("RN50", "image")):
        for batch in (1, 32):
            for precision in ("fp32", "bf16", "int8"):
                if _on_cpu(scope, arch, tower, batch, precision):
                    contenders = {"fp32": CONTENDERS, "bf16": MAINTAINED, "int8": (CLIPFORGE,)}[precision]
                    cells.append(Cell(arch, tower, batch, precision, contenders))
    return cells


def _on_cpu(scope: str, arch: str, tower: str, batch: int, precision: str) -> bool:
    """Whether a CPU run measures a cell."""
    main = (arch, tower) == ("ViT-B-32", "image")
    if precision == "int8":
        return arch != "RN50" and (scope != "quick" or main)
    if scope == "complete":
        return True
    if precision == "bf16" and batch > 1:  # slow without native bf16 (see the matmul peak): ~3 min more
        return False
    return scope == "default" or main or (batch == 1 and precision == "fp32")


def run(pool: Pool) -> list[Row]:
    s = pool.settings
    rows = []
    flops: dict[tuple[str, str], float] = {}
    for cell in plan(s.device, s.scope):
        key = (cell.arch, cell.tower)
        if key not in flops:
            flops[key] = pool.run(CLIPFORGE, "bench.peak:encode_flops", arch=cell.arch, tower=cell.tower)
        args = {"arch": cell.arch, "tower": cell.tower, "batch": cell.batch, "precision": cell.precision}
        measured = pool.measure(
            cell.contenders, "bench.encoding:make_case", lambda c, a=args: {"lib": c.lib, **a}
        )
        unit = "images/s" if cell.tower == "image" else "texts/s"
        results = {k: m.seconds.map(lambda t, n=m.info["items"]: n / t) for k, m in measured.items()}
        row = Row("encode", cell.case, unit, results, precision=cell.precision, flops_per_item=flops[key])
        row.best_of = cell.case
        labels = {c.key: c.label for c in cell.contenders}
        agreement = {k: m.info["cosine_to_fp32"] for k, m in measured.items() if "cosine_to_fp32" in m.info}
        if agreement:
            shown = ", ".join(f"{labels[k]} {c:.5f}" for k, c in agreement.items())
            row.note = f"{cell.case}, {cell.precision} vs fp32 outputs, min cosine: {shown}"
            if any(m.info.get("int8_kept_fp32") for m in measured.values()):
                row.note += " (no fast int8 matmul on this CPU: the int8 copy kept fp32 layers)"
        row.check_parameters({k: m.info["parameters"] for k, m in measured.items()})
        rows.append(row)
        print(row.brief(), flush=True)
    return rows
