"""WiSE-FT weight-space ensembling: θ = (1 − α)·θ_A + α·θ_B.

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (WiSE-FT): interpolating the weights of a
zero-shot model A and the same model fine-tuned (B) gives, for intermediate α, most of the fine-tuned
accuracy in-domain while keeping much of the zero-shot robustness under distribution shift.

Rules, checked before anything is computed:

- the two models have the same architecture: equal configs, and the same keys with the same shapes and
  dtypes; the first difference raises `ValueError` naming the key (or config field) and both sides;
- α is finite and in [0, 1]; with `extrapolate=True` any finite α is taken (the paper's appendix also
  looks at α > 1, moving past the fine-tuned weights).

Floating tensors are mixed in float64 and cast back to their own dtype, so a float32 or float16 result is
the correctly rounded mix; elements equal in A and B are copied unchanged (so equal infinities, as in an
attention mask, stay infinite). α = 0 gives A's tensors and α = 1 B's, bit for bit.

Non-floating tensors (integer buffers such as a BatchNorm's `num_batches_tracked`) cannot be
interpolated: where A and B hold different values, the merge takes those of the endpoint α is nearer to
(A for α ≤ 0.5, B above), which keeps α = 0 and α = 1 exact. They count batches and do not change what
an eval-mode model computes.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]


def check_alpha(alpha: float, extrapolate: bool = False) -> float:
    """`alpha` as a float, or `ValueError`: it must be finite, and within [0, 1] unless `extrapolate`."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"alpha must be finite, got {value}")
    if not extrapolate and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha {value:g} is outside [0, 1] (0: model A, 1: model B); "
            "pass --extrapolate (extrapolate=True) to use it"
        )
    return value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"vision.width": 64, ...} from nested dicts, so a config difference can be named by its field."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_config(config_a: Any, config_b: Any) -> None:
    """`ValueError` naming the first field where two `CLIPConfig`s differ."""
    if config_a == config_b:
        return
    a, b = _flatten(config_a.to_dict()), _flatten(config_b.to_dict())
    for field in [*a, *(f for f in b if f not in a)]:
        if a.get(field, "<absent>") != b.get(field, "<absent>"):
            shown_a, shown_b = a.get(field, "<absent>"), b.get(field, "<absent>")
            raise ValueError(
                f"different architectures: config field {field} is {shown_a} in A, {shown_b} in B"
            )
    raise ValueError("different architectures: the configs differ")  # equal dicts, unequal objects


def _describe(tensor: torch.Tensor | None) -> str:
    return "absent" if tensor is None else f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def check_same_tensors(a: StateDict, b: StateDict) -> None:
    """`ValueError` naming the first key (A's order, then B's extra keys) missing from one state dict or
    differing in shape or dtype, with both sides."""
    for key in [*a, *(k for k in b if k not in a)]:
        ta, tb = a.get(key), b.get(key)
        if ta is None or tb is None or ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise ValueError(f"different architectures: {key} is {_describe(ta)} in A, {_describe(tb)} in B")


def _mix(ta: torch.Tensor, tb: torch.Tensor, alpha: float) -> torch.Tensor:
    if not (ta.is_floating_point() or ta.is_complex()):
        # Counters cannot be interpolated: the nearer endpoint's (see the module docstring).
        return (ta if alpha <= 0.5 else tb).clone()
    wide = torch.complex128 if ta.is_complex() else torch.float64
    mixed = ((1.0 - alpha) * ta.to(wide) + alpha * tb.to(wide).to(ta.device)).to(ta.dtype)
    # Equal elements are copied, not recomputed: (1 - α)·x + α·x can round, and is NaN for x = ±inf.
    return torch.where(ta == tb.to(ta.device), ta, mixed)


@torch.no_grad()
def merge_state_dicts(a: StateDict, b: StateDict, alpha: float, extrapolate: bool = False) -> dict[str, Any]:
    """(1 − α)·a + α·b, key by key, as new tensors on a's devices (see the module docstring for the rules).

    α = 0 returns copies of a's tensors and α = 1 of b's, bit for bit; `ValueError` when the keys, shapes or
    dtypes differ (naming the first such key) or α is refused by `check_alpha`."""
    alpha = check_alpha(alpha, extrapolate)
    check_same_tensors(a, b)
    if alpha == 0.0 or alpha == 1.0:
        # Exactly one endpoint, whatever the other holds (a NaN or inf there would leak into 0·x).
        source = a if alpha == 0.0 else b
        return {key: source[key].detach().clone().to(a[key].device) for key in a}
    return {key: _mix(a[key].detach(), b[key].detach(), alpha) for key in a}


def check_same_tokenizer(tokenizer_a: Any, tokenizer_b: Any) -> None:
    """`ValueError` when both tokenizers name their vocabulary (`identity`) and the names differ: rows of
    the token embedding are merged one by one, so they must stand for the same tokens."""
    id_a, id_b = getattr(tokenizer_a, "identity", None), getattr(tokenizer_b, "identity", None)
    if id_a is not None and id_b is not None and id_a != id_b:
        raise ValueError(f"A and B use different tokenizers ({id_a} and {id_b}): their weights do not match")


def load_pair(a: str | os.PathLike, b: str | os.PathLike) -> tuple[nn.Module, nn.Module, Any]:
    """(model A, model B, A's tokenizer), each read by `clipforge.load` on the CPU, refused with a
    `ValueError` (naming which model, or the first difference) unless the two can be merged."""
    from clipforge.checkpoints import load

    loaded = []
    for which, name_or_path in (("A", a), ("B", b)):
        try:
            model, _, tokenizer = load(name_or_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"model {which}: {e}") from None
        loaded.append((model, tokenizer))
    (model_a, tokenizer_a), (model_b, tokenizer_b) = loaded
    check_same_config(model_a.config, model_b.config)  # before the tokenizers: the deeper difference
    check_same_tokenizer(tokenizer_a, tokenizer_b)
    return model_a, model_b, tokenizer_a


@torch.no_grad()
def merge_models(a: nn.Module, b: nn.Module, alpha: float, extrapolate: bool = False) -> nn.Module:
    """A new model, a copy of `a` holding the WiSE-FT merge of `a`'s and `b`'s weights at `alpha`.

    Both are clipforge CLIP models (with a `config`); their configs must be equal, then their state dicts
    are merged by `merge_state_dicts`. Neither input is changed."""
    config_a, config_b = getattr(a, "config", None), getattr(b, "config", None)
    if config_a is None or config_b is None:
        raise ValueError(
            "merge_models needs two clipforge CLIP models (with a .config); use merge_state_dicts"
        )
    check_alpha(alpha, extrapolate)
    check_same_config(config_a, config_b)
    merged = merge_state_dicts(a.state_dict(), b.state_dict(), alpha, extrapolate)
    model = copy.deepcopy(a)
    model.load_state_dict(merged, strict=True)
    return model
