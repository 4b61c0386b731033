"""The progress line: samples/s, loss, learning rate, logit scale, skipped samples and ETA (via tqdm)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self._bar = tqdm(
            total=total, initial=start, unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr
        )
        self._enabled = enabled

    def update(self, step: int, *, loss: float, lr: float, scale: float, skipped: int, rate: float) -> None:
        self._bar.set_postfix_str(
            f"loss {loss:.4f} lr {lr:.2e} scale {scale:.1f} skipped {skipped} {rate:.0f} samples/s",
            refresh=False,
        )
        self._bar.update(step - self._bar.n)

    def note(self, message: str) -> None:
        """A line above the bar (or on stdout when the bar is off)."""
        if self._enabled:
            tqdm.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self._bar.close()
