"""Positional embeddings resized to another grid or context (`clipforge.models.resize`): the identity at
the same size, fields that bicubic interpolation must keep (constant, linear), the leading row kept, text
tables cut to a shorter context and refused a longer one."""

from __future__ import annotations

import math

import pytest
import torch

from clipforge.models import create_model
from clipforge.models.resize import (
    GRID_TABLES,
    TEXT_TABLE,
    fit_positional_embeddings,
    grid_side,
    resize_context_embedding,
    resize_grid_embedding,
)

WIDTH = 3


def grid_table(side: int, field, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """A (1 + side², WIDTH) table whose grid row (i, j) holds field(i, j) in every channel."""
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = field(i.double(), j.double()).reshape(-1, 1).expand(-1, WIDTH)
    first = torch.full((1, WIDTH), 7.0, dtype=torch.float64) if prefix is None else prefix
    return torch.cat([first, cells]).float()


def source_coordinate(k: int, old: int, new: int) -> float:
    """Where output cell k samples the input grid with align_corners=False."""
    return (k + 0.5) * old / new - 0.5


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_same_size_is_the_identity(kind):
    model = create_model("ViT-Nano-16-64" if kind == "vit" else "RN-Tiny-64")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    state = model.state_dict()
    fitted = fit_positional_embeddings(state, state, kind)
    assert fitted.keys() == state.keys()
    assert all(fitted[k] is state[k] for k in state)  # the very tensors: bit-exact
    table = state[GRID_TABLES[kind]]
    assert resize_grid_embedding(table, grid_side(table)) is table
    assert resize_context_embedding(state[TEXT_TABLE], state[TEXT_TABLE].shape[0]) is state[TEXT_TABLE]


@pytest.mark.parametrize(("old", "new"), [(4, 7), (8, 5), (3, 12)])
def test_a_constant_field_stays_constant_and_the_leading_row_is_kept(old, new):
    table = grid_table(old, lambda i, j: torch.full_like(i, 0.3125))
    table[0] = torch.tensor([1.5, -2.0, 1e-3])
    resized = resize_grid_embedding(table, new)
    assert resized.shape == (1 + new * new, WIDTH)
    assert torch.equal(resized[0], table[0])
    torch.testing.assert_close(resized[1:], torch.full((new * new, WIDTH), 0.3125), rtol=0, atol=1e-6)


def interior_errors(old: int, new: int, slopes: tuple[float, float]) -> list[float]:
    """|resized - field at the source coordinate| of a linear field, over the output cells whose 4 taps
    per axis lie inside the input grid (so the border clamp plays no part)."""
    a, b = slopes
    resized = resize_grid_embedding(grid_table(old, lambda i, j: a * i + b * j + 2.0), new)
    grid = resized[1:, 0].reshape(new, new).double()
    inside = [k for k in range(new) if 1 <= math.floor(source_coordinate(k, old, new)) <= old - 3]
    return [
        abs(grid[k, m].item() - (a * source_coordinate(k, old, new) + b * source_coordinate(m, old, new) + 2))
        for k in inside
        for m in inside
    ]


def test_a_linear_field_is_kept_where_the_cells_fall_midway():
    """Halving the grid puts each output cell midway between two input cells, where cubic convolution is
    symmetric and so reproduces a linear field."""
    errors = interior_errors(8, 4, (0.25, -0.5))
    assert len(errors) == 4 and max(errors) < 1e-6


@pytest.mark.parametrize(("old", "new"), [(4, 7), (8, 5), (6, 16), (16, 24)])
def test_a_linear_field_is_followed_closely_at_any_size(old, new):
    """PyTorch's bicubic is Keys' cubic convolution with a = -0.75, which reproduces constants exactly
    but linear functions only to within about 0.05 cell of their slope (a = -0.5 would be exact)."""
    slopes = (0.25, -0.5)
    errors = interior_errors(old, new, slopes)
    assert errors and max(errors) < 0.05 * sum(map(abs, slopes))


def test_bfloat16_tables_are_interpolated_in_float32_and_returned_as_they_came():
    table = torch.randn(1 + 16, 8).bfloat16()
    resized = resize_grid_embedding(table, 6)
    assert resized.dtype == torch.bfloat16
    expected = (
        torch.nn.functional.interpolate(
            table[1:].float().reshape(4, 4, 8).permute(2, 0, 1)[None], size=(6, 6), mode="bicubic"
        )[0]
        .permute(1, 2, 0)
        .reshape(36, 8)
    )
    assert torch.equal(resized[1:], expected.bfloat16())
    assert torch.equal(resized[0], table[0])


def test_a_shorter_context_keeps_the_first_rows_and_a_longer_one_is_refused():
    table = torch.randn(77, 16)
    assert torch.equal(resize_context_embedding(table, 20), table[:20])
    with pytest.raises(ValueError, match="longer than the 77 learned positions"):
        resize_context_embedding(table, 78)


def test_a_table_that_is_not_a_square_grid_is_refused():
    with pytest.raises(ValueError, match="not 1 \\+ a square grid"):
        grid_side(torch.zeros(1 + 15, 4))


@pytest.mark.parametrize(("name", "kind"), [("ViT-Nano-16-64", "vit"), ("RN-Tiny-64", "resnet")])
def test_a_state_dict_fits_a_model_of_another_size(name, kind):
    import dataclasses

    from clipforge.models import get_config

    small = create_model(name)
    config = get_config(name)
    bigger = dataclasses.replace(
        config,
        vision=dataclasses.replace(config.vision, image_size=config.vision.image_size * 2),
        text=dataclasses.replace(config.text, context_length=20),
    )
    target = create_model(bigger)
    fitted = fit_positional_embeddings(small.state_dict(), target.state_dict(), kind)
    target.load_state_dict(fitted, strict=True)  # every shape fits
    key = GRID_TABLES[kind]
    assert torch.equal(target.state_dict()[key][0], small.state_dict()[key][0])
    assert torch.equal(target.positional_embedding, small.positional_embedding[:20])
