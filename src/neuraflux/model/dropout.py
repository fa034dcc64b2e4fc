"""Dropout for CPU training that costs what a multiply costs.

`torch.nn.functional.dropout` on CPU draws one Mersenne-Twister number per element and the fused attention kernel
has no CPU path with dropout, so at the `nano` shape (dropout 0.2) the masks and the unfused float32 attention
took 35-45 % of a bf16-mixed training step. Here the mask comes from random 64-bit words, four 16-bit draws
each, turned into all-ones / all-zeros bit patterns with integer shifts; applying it is a bitwise AND on the
activations' bits and one multiply by 1 / (1 - p). The backward pass reuses the stored mask the same way.

Each element is kept with probability 1 - p', p' = round(p * 2**15) / 2**15 (|p - p'| <= 2**-16), independently,
from the default CPU generator (so `seed_everything` makes runs repeat). On other devices the model uses torch's
own dropout and fused attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_RESOLUTION = 1 << 15  # p is rounded to a multiple of 2**-15
_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float dtype's bits, reinterpreted


def drop_threshold(p: float) -> int:
    """The 15-bit draw r in [-2**14, 2**14) is dropped when r < threshold: probability round(p * 2**15) / 2**15."""
    return round(p * _RESOLUTION) - _RESOLUTION // 2


def keep_bits(shape: torch.Size, p: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A tensor of `dtype`'s integer twin (int16 for bf16/fp16, int32 for fp32): -1 (every bit set) where an
    element is kept, 0 where it is dropped."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over all 2**16 values
    # r >> 1 is uniform on [-2**14, 2**14); minus the threshold it stays inside int16, and its sign bit, spread by
    # an arithmetic shift, is -1 exactly when r < threshold. The complement is the keep pattern.
    bits = draws.bitwise_right_shift_(1).sub_(drop_threshold(p)).bitwise_right_shift_(15).bitwise_not_()
    width = torch.empty((), dtype=dtype).element_size()
    return bits if width == 2 else bits.to(_WORDS[width])  # sign extension keeps -1 as all ones


def keep_scale(p: float) -> float:
    """1 / (1 - p'), the survivors' factor for the rounded rate."""
    return _RESOLUTION / (_RESOLUTION - round(p * _RESOLUTION))


def _masked(x: torch.Tensor, bits: torch.Tensor, scale: float) -> torch.Tensor:
    word = _WORDS[x.element_size()]
    y = torch.bitwise_and(x.view(word), bits).view(x.dtype)
    return y if scale == 1.0 else y.mul_(scale)


class _BitDropout(torch.autograd.Function):
    """x * keep * scale; scale 1 leaves the survivors' factor to the caller (attention applies it to the
    4x smaller output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, scale: float) -> torch.Tensor:
        bits = keep_bits(x.shape, p, x.dtype, x.device)
        ctx.save_for_backward(bits)
        ctx.scale = scale
        return _masked(x, bits, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (bits,) = ctx.saved_tensors
        return _masked(grad.contiguous(), bits, ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout's contract (zero with probability p, survivors scaled by 1 / (1 - p)); the bit-mask path on CPU
    floating tensors, torch's own elsewhere."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or p >= 1.0:
        return F.dropout(x, p, training=True)
    return _BitDropout.apply(x, p, keep_scale(p))


class NanoDropout(nn.Dropout):
    """nn.Dropout with the fast CPU mask (`set_dropout` and `model.eval()` treat it as any nn.Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) with dropout on the weights, @ v: q (B, H, T, D), k and v (B, H, T, D),
    mask None (causal) or bool (B|1, 1, T, T), True = may attend.

    Written out for CPU training: scaled_dot_product_attention's CPU path with dropout is its unfused float32
    reference (it upcasts bf16), which made attention the slowest part of a bf16 step. The scale and the causal
    mask enter through one baddbmm; the matmuls run in the inputs' dtype (bf16 under autocast).
    """
    B, H, T, D = q.shape
    if mask is None:
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)[None]
        scores = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D**-0.5)
        scores = scores.view(B, H, T, T)
    else:
        scores = (q @ k.transpose(-2, -1)).mul_(D**-0.5).masked_fill_(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if p >= 1.0:
        return F.dropout(weights, p) @ v
    return (_BitDropout.apply(weights, p, 1.0) @ v).mul_(keep_scale(p))
