"""Positional embeddings fitted to another image size or context length, so that pretrained weights can
start a model whose grid of patches (or of ResNet features) or whose text context differs.

Image grids: the leading row (a ViT's class token, a ResNet attention pool's mean token) is kept as it is;
the g x g grid rows are resized as a 2-D image of `width` channels, bicubic, computed in float32 with
`align_corners=False` (each row is the centre of a cell, the grid's borders line up) and no antialiasing.
Text: a shorter context keeps the first rows, which is exact for texts that fit (the causal mask means a
position never sees those after it); a longer one is refused, since it would have no learned positions.
At the same size every function returns its input unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

# The state-dict key of each image tower's grid table, by `VisionConfig.kind`; each has one leading row.
GRID_TABLES = {"vit": "visual.positional_embedding", "resnet": "visual.attnpool.positional_embedding"}
TEXT_TABLE = "positional_embedding"  # (context_length, width)


def grid_side(table: torch.Tensor, prefix_rows: int = 1) -> int:
    """The side g of a (prefix_rows + g*g, width) table."""
    cells = table.shape[0] - prefix_rows
    side = math.isqrt(max(cells, 0))
    if cells <= 0 or side * side != cells:
        raise ValueError(f"a table of {table.shape[0]} rows is not {prefix_rows} + a square grid")
    return side


def resize_grid_embedding(table: torch.Tensor, grid: int, prefix_rows: int = 1) -> torch.Tensor:
    """(prefix_rows + g*g, width) -> (prefix_rows + grid*grid, width), as the module docstring says; the
    same tensor when g == grid."""
    old = grid_side(table, prefix_rows)
    if old == grid:
        return table
    width = table.shape[1]
    cells = table[prefix_rows:].float().reshape(old, old, width).permute(2, 0, 1).unsqueeze(0)
    cells = F.interpolate(cells, size=(grid, grid), mode="bicubic", align_corners=False)
    cells = cells.squeeze(0).permute(1, 2, 0).reshape(grid * grid, width)
    return torch.cat([table[:prefix_rows], cells.to(table.dtype)])


def resize_context_embedding(table: torch.Tensor, context_length: int) -> torch.Tensor:
    """(L, width) -> (context_length, width): the first rows when shorter, the same tensor when equal."""
    rows = table.shape[0]
    if context_length > rows:
        raise ValueError(
            f"a context of {context_length} tokens is longer than the {rows} learned positions: the new "
            f"positions would have no trained values (use a context of at most {rows})"
        )
    return table if context_length == rows else table[:context_length]


def fit_positional_embeddings(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], vision_kind: str
) -> dict[str, torch.Tensor]:
    """`state` with its image-grid and text positional tables resized to the shapes they have in `target`
    (the state dict of the model to load into); every other tensor as it was."""
    fitted = dict(state)
    grid_key = GRID_TABLES[vision_kind]
    fitted[grid_key] = resize_grid_embedding(state[grid_key], grid_side(target[grid_key]))
    fitted[TEXT_TABLE] = resize_context_embedding(state[TEXT_TABLE], target[TEXT_TABLE].shape[0])
    return fitted
