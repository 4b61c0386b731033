"""Training-step throughput and the memory a training step needs, by batch size.

One step, the same for every library: both towers forward (under bf16 autocast for "bf16"), L2-normalized
features, the paper's symmetric contrastive loss in fp32, backward, AdamW (torch's fused kernel, the paper's
ViT betas, weight decay 0.2 on every parameter), zero_grad. Only the model code differs between libraries.
(clipforge's own `train_step` also computes the gradient norm for clipping and the logging; not timed here.)
OpenAI released no training code, so OpenAI's `clip` is not in these rows.

Memory: each point runs in a fresh process. It builds the model, optimizer and inputs, resets the peak-RSS
mark (`/proc/self/clear_refs`), runs warm-up steps and the measured steps, and reports the peak resident set
minus the resident set just before the first step: gradients, AdamW's two moments, activations and whatever
the allocator keeps. One measurement per point (a fresh process each: no repetitions). On a GPU: the peak of
`torch.cuda.max_memory_allocated` over the same baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import libraries
from bench.encoding import autocast
from bench.envs import CLIPFORGE, CONTENDERS, Contender, Pool
from bench.machine import reset_peak_rss, rss_mib
from bench.results import Row
from bench.specs import ARCHS, make_images, make_tokens
from bench.timing import Stats

TRAINERS = tuple(c for c in CONTENDERS if c.lib != "openai")
# clipforge and the peers, each on its own environment's torch:
MAIN = tuple(c for c in TRAINERS if c.key != "clipforge_peer_torch")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Radford et al. 2021, Figure 3: mean of image->text and text->image cross-entropy."""
    logits = logit_scale.exp() * image @ text.t()  # (B, B)
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def make_case(
    lib: str, arch: str, batch: int, precision: str, device: str
) -> tuple[Callable[[], object], dict]:
    """Worker side: a fresh model and optimizer, and a callable that does one training step."""
    a = ARCHS[arch]
    built = libraries.build(lib, a, device)
    built.model.train()
    optimizer = torch.optim.AdamW(
        built.model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=True
    )
    images, tokens = make_images(a, batch, device), make_tokens(a, batch, device)

    def step() -> None:
        with autocast(precision, device):
            image_features, text_features = built.encode_image(images), built.encode_text(tokens)
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        contrastive_loss(image_features, text_features, built.logit_scale()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, {"items": batch, **libraries.describe(built)}


def memory_point(
    lib: str, arch: str, batch: int, precision: str, warmup_steps: int, steps: int, device: str
) -> dict:
    """Worker side, in a fresh process: peak memory of training steps above the memory before them (MiB)."""
    step, info = make_case(lib, arch, batch, precision, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        before = rss_mib("VmRSS")
    for _ in range(warmup_steps + steps):
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mib("VmHWM")
    return {"before_mib": before, "peak_mib": peak, "delta_mib": peak - before, **info}


# ----------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    arch: str
    batch: int
    precision: str
    contenders: tuple[Contender, ...]

    @property
    def case(self) -> str:
        return f"{self.arch} train step, batch {self.batch}"


def plan(device: str, scope: str) -> list[Cell]:
    """The architectures to train; bf16 beside fp32 on a GPU, and on a CPU only in a complete run (it is
    slower than fp32 on CPUs without native bf16: see the encoding rows and the matmul peak)."""
    if device.startswith("cuda"):
        archs = (("ViT-Mini-8-64", 512), ("ViT-B-16", 128))
        return [Cell(a, b, p, MAIN) for a, b in archs for p in ("bf16", "fp32")]
    mini, b32 = ("ViT-Mini-8-64", 128), ("ViT-B-32", 8)
    cells = [Cell(*mini, "fp32", TRAINERS)]
    if scope != "quick":
        cells.append(Cell(*b32, "fp32", TRAINERS))
    if scope == "complete":
        cells += [Cell(*mini, "bf16", MAIN), Cell(*b32, "bf16", MAIN)]
    return cells


def run(pool: Pool) -> list[Row]:
    s = pool.settings
    rows = []
    for cell in plan(s.device, s.scope):
        flops = pool.run(CLIPFORGE, "bench.peak:train_flops", arch=cell.arch, batch=cell.batch)
        args = {"arch": cell.arch, "batch": cell.batch, "precision": cell.precision}
        measured = pool.measure(
            cell.contenders, "bench.training:make_case", lambda c, a=args: {"lib": c.lib, **a}
        )
        results = {k: m.seconds.map(lambda t, n=m.info["items"]: n / t) for k, m in measured.items()}
        row = Row("train", cell.case, "pairs/s", results, precision=cell.precision, flops_per_item=flops)
        row.best_of = cell.case
        row.check_parameters({k: m.info["parameters"] for k, m in measured.items()})
        rows.append(row)
        print(row.brief(), flush=True)
    return rows


def memory_plan(device: str, scope: str) -> list[tuple[str, tuple[int, ...]]]:
    if device.startswith("cuda"):
        return [("ViT-B-16", (64, 128, 256))]
    return {
        "quick": [("ViT-Mini-8-64", (64,))],
        "default": [("ViT-Mini-8-64", (32, 128)), ("ViT-B-32", (8,))],
        "complete": [("ViT-Mini-8-64", (32, 64, 128, 256)), ("ViT-B-32", (8, 16, 32))],
    }[scope]


def run_memory(pool: Pool) -> list[Row]:
    """One fresh process per (contender, batch); fp32 on a CPU, bf16 on a GPU (each one's best setting)."""
    s = pool.settings
    pool.stop_workers()  # their models and allocator caches would crowd the machine's memory meanwhile
    precision = "bf16" if s.device.startswith("cuda") else "fp32"
    rows = []
    for arch, batches in memory_plan(s.device, s.scope):
        for batch in batches:
            results, extra = {}, {}
            for c in pool.enabled(MAIN):
                with pool.fresh(c) as worker:
                    args = {"lib": c.lib, "arch": arch, "batch": batch, "precision": precision}
                    answer = worker.request(
                        "run",
                        function="bench.training:memory_point",
                        args={**args, "warmup_steps": 1, "steps": 1},
                    )["result"]
                results[c.key] = Stats.of([answer["delta_mib"]])
                extra[c.key] = answer
            row = Row("memory", f"{arch} train step, batch {batch}", "MiB", results, higher_is_better=False)
            row.precision = precision
            row.extra["runs"] = extra
            rows.append(row)
            print(row.brief(), flush=True)
    return rows
