"""Small shared test helpers (imported by test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


def stub_tokenizer(texts: list[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Bytes as token ids: enough for the data pipeline, needs no vocabulary file, and reversible."""
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = list(text.encode())[:context_length]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def captions_of(tokens: torch.Tensor) -> list[str]:
    """The texts back from `stub_tokenizer` ids."""
    return [bytes(row[row > 0].tolist()).decode() for row in tokens]


def word_tokenizer(texts: list[str]) -> torch.Tensor:
    """Deterministic ids per word in a 16-token context, SOT first and EOT (the largest id) last, as a
    CLIP text tower expects; no vocabulary file needed."""
    out = torch.zeros(len(texts), 16, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [49406, *[sum(map(ord, w)) % 49000 + 1 for w in text.split()][:14], 49407]
        out[i, : len(ids)] = torch.tensor(ids)
    return out
