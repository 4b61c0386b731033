"""An exponential moving average of the weights (`optim.ema`), kept beside the model a run trains.

After each update the average moves towards the trained weights: avg <- avg + (1 - d) * (w - avg), with
d = min(optim.ema, (1 + step) / (10 + step)). The ramp keeps the first steps from being averaged with the
random initialization for a long time: at step 10 the average is still mostly recent weights, and only
after about 10 / (1 - optim.ema) steps does the full decay apply. Buffers (a ResNet's BatchNorm statistics)
are copied, not averaged.

The average is a whole model: training-time evaluation scores it, and each checkpoint saves it as a
clipforge directory `ema/` beside the trained weights, so `clipforge eval ... --model RUN/step-N/ema`
reads it and a resumed run continues it exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipforge.models import CLIP

EMA_DIR = "ema"


class WeightAverage:
    def __init__(self, model: CLIP, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: CLIP, step: int) -> None:
        """Move towards `model`'s weights after update number `step` (1 for the first)."""
        averaged = list(self.model.parameters())
        trained = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, trained, 1.0 - self.decay_at(step))
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def load(self, checkpoint: Path) -> bool:
        """Restore the average a checkpoint saved; False when it has none (the average restarts from the
        restored weights)."""
        weights = checkpoint / EMA_DIR / "model.safetensors"
        if not weights.is_file():
            return False
        self.model.load_state_dict(load_file(weights), strict=True)
        return True
