"""Reductions over padded `(B, T)` tensors, written once: every mean over padding in the package goes through
`masked_mean` (the alignment maths, retrieval's pooling), so padding is handled and tested in one place.

Masks are bool with `True` marking a position that counts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_mask(x: Tensor, mask: Tensor, name: str = "mask") -> None:
    """Raise if `mask` is not a bool tensor of exactly `x`'s shape (a float or broadcast mask is a silent bug)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor (True = counts), got {got}")
    if mask.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the values have shape {tuple(x.shape)}")


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of `x` over positions where `mask` is True; over `dim`, or over everything when `dim` is None.

    Masked positions are replaced by zero rather than multiplied by it, so a NaN or inf in padding cannot leak.
    """
    check_mask(x, mask)
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is True; over `dim`, or over everything when `dim` is None.

    x, mask: same shape, e.g. `(B, T)`. With `dim=-1` the result is `(B,)`. A slice with no valid position has
    mean 0 (the count is clamped to 1), so a fully padded row contributes nothing instead of NaN.
    """
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp_min(1).to(total.dtype)


def last_token_index(mask: Tensor) -> Tensor:
    """(B, T) bool -> (B,) long: the column of each row's last True (0 for a row with none). Works for left and
    right padding."""
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).long().argmax(-1)  # argmax finds the first True from the right
    return last.where(mask.any(-1), torch.zeros_like(last))
