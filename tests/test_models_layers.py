"""Attention (models/layers.py): explicit matmuls and SDPA compute the same attention; which one runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.models.layers import (
    EXPLICIT_ATTENTION_MAX_TOKENS,
    Attention,
    attend,
    explicit_attention,
    uses_explicit_attention,
)


def _qkv(tokens: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(3, 2, tokens, 16, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_is_sdpa_in_float64(causal: bool) -> None:
    q, k, v = _qkv(9)
    ours = explicit_attention(q, k, v, causal)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_attention_ignores_later_tokens() -> None:
    q, k, v = (t.detach() for t in _qkv(6))
    changed = v.clone()
    changed[..., 4:, :] += 1.0  # later tokens' values must not reach earlier positions
    a, b = explicit_attention(q, k, v, causal=True), explicit_attention(q, k, changed, causal=True)
    assert torch.equal(a[..., :4, :], b[..., :4, :]) and not torch.equal(a[..., 4:, :], b[..., 4:, :])


def test_explicit_matmuls_only_for_short_bf16_sequences_on_cpu() -> None:
    short = torch.zeros(1, 1, EXPLICIT_ATTENTION_MAX_TOKENS, 8)
    long = torch.zeros(1, 1, EXPLICIT_ATTENTION_MAX_TOKENS + 1, 8)
    assert uses_explicit_attention(short.bfloat16())
    assert not uses_explicit_attention(long.bfloat16())
    assert not uses_explicit_attention(short)  # fp32 keeps SDPA
    assert not uses_explicit_attention(short.half())


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_matches_fp32(causal: bool) -> None:
    # The bf16 path (explicit matmuls) against fp32 SDPA: q k^T and p v round their operands to bfloat16
    # (unit roundoff 2^-8) and sum in fp32; the softmax runs in fp32. Each output is a convex mix of v's
    # rows, so a few roundings of 2^-8 of |v| bound the difference; a wrong scale or mask moves it by O(1).
    q, k, v = (t.detach().float() for t in _qkv(65))
    half = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 8 * 2**-8 * v.abs().max()


def test_attention_module_under_autocast_trains_through_the_explicit_path() -> None:
    torch.manual_seed(0)
    layer = Attention(32, 4)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(4, 20, 32)
    full = layer(x, causal=True)
    full_grads = torch.autograd.grad(full.square().sum(), list(layer.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = layer(x, causal=True)
    half_grads = torch.autograd.grad(half.float().square().sum(), list(layer.parameters()))
    cosine = F.cosine_similarity(half.float().flatten(), full.flatten(), dim=0)
    assert cosine > 0.999
    for a, b in zip(half_grads, full_grads, strict=True):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
