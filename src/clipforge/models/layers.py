"""Building blocks shared by the text and vision towers.

Parameter names follow OpenAI's released files (`attn.in_proj_weight`, `mlp.c_fc`, `ln_1`, ...) so their
state dicts load as they are. Activations are batch-first, (B, T, C), which is what SDPA wants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as in the released models (stable under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


QUICK_GELU_SCALE = 1.702


class _QuickGELUFunction(torch.autograd.Function):
    """silu(1.702 x) / 1.702 with a one-pass backward.

    d/dx [silu(1.702 x) / 1.702] = silu'(1.702 x): the two scalings cancel, so the gradient is one
    `silu_backward` on the saved 1.702 x. Autograd through the three ops makes three passes instead.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        scaled = x * QUICK_GELU_SCALE
        ctx.save_for_backward(scaled)
        return F.silu(scaled).div_(QUICK_GELU_SCALE)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (scaled,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.ops.aten.silu_backward(grad, scaled)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation the released CLIP models were trained with.

    Computed as silu(1.702 x) / 1.702, the same function, with a one-pass backward (`_QuickGELUFunction`):
    forward + backward take about half the time of autograd through sigmoid and two products on a CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing():  # a trace records ops
            return _QuickGELUFunction.apply(x)
        return F.silu(x * QUICK_GELU_SCALE).div_(QUICK_GELU_SCALE)


ACTIVATIONS: dict[str, type[nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; available: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


# Below this many tokens, attention in bf16 on a CPU is faster as explicit matmuls than through SDPA: the
# CPU flash kernel's bf16 backward took 2.5-5x the explicit one's time at 50-100 tokens (ViT-B/32's 50, the
# text's 77, small ViTs' 65), and its forward ~2x; from ~130 tokens on SDPA wins, and it needs no T x T
# scores in memory. In fp32 SDPA is as fast or faster in training at these lengths, so fp32 keeps SDPA.
EXPLICIT_ATTENTION_MAX_TOKENS = 100


def uses_explicit_attention(q: torch.Tensor) -> bool:
    """Whether `attend` computes q's attention as explicit matmuls rather than through SDPA."""
    return (
        q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= EXPLICIT_ATTENTION_MAX_TOKENS
    )


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, H, T, D) inputs, the softmax in fp32 or wider."""
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * (q.shape[-1] ** -0.5)
    if causal:
        T = q.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention by whichever of SDPA and explicit matmuls is faster for q."""
    if uses_explicit_attention(q):
        return explicit_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, computed by `attend`.

    Same parameters as `nn.MultiheadAttention` (in_proj_weight [3C, C], in_proj_bias, out_proj), but
    batch-first and without its sequence-first transposes.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.project_qkv(x)
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients in one pass, where
        # three selects would each zero-fill a full-size gradient and then add them up.
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = attend(q, k, v, causal)  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Sequential):
    """c_fc -> activation -> c_proj; a Sequential so the keys read `mlp.c_fc.weight` as OpenAI's."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (`resblocks.N.*` in the weight files)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation) for _ in range(layers)
        )
        # Recompute each block's activations in the backward pass instead of storing them.
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    @torch.no_grad()
    def init_scaled_normal(self) -> None:
        """The scheme OpenAI applied to the text tower: normal weights whose std shrinks with width and,
        for the projections that write into the residual stream, with depth; biases as `init_default`."""
        self.init_default()
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * len(self.resblocks)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    @torch.no_grad()
    def init_default(self) -> None:
        """PyTorch's defaults for these layers (what the ViT tower of the released code was left with):
        xavier-uniform fused QKV, zero attention biases, kaiming-uniform Linears."""
        for block in self.resblocks:
            nn.init.xavier_uniform_(block.attn.in_proj_weight)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.zeros_(block.attn.out_proj.bias)
            for linear in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            for linear in (block.mlp.c_fc, block.mlp.c_proj):
                bound = 1 / math.sqrt(linear.in_features)
                nn.init.uniform_(linear.bias, -bound, bound)
