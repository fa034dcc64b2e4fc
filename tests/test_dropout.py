"""The bit-mask dropout and the written-out attention the model trains with on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neuraflux.model import NanoConfig, NanoLM
from neuraflux.model.dropout import NanoDropout, attention_with_dropout, dropout, keep_bits, keep_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_drops_each_element_with_probability_p_and_scales_the_rest(dtype, p):
    torch.manual_seed(0)
    n = 400_000
    x = torch.randn(n, dtype=dtype)
    y = dropout(x, p)
    dropped = y == 0
    # binomial: 5 standard deviations of the dropped share
    assert abs(dropped.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # survivors are x / (1 - p) (p rounded to 2**-15: 0.2 -> 6554 / 32768), computed in x's dtype
    scale = 32768 / (32768 - round(p * 32768))
    assert scale == keep_scale(p)
    torch.testing.assert_close(y[~dropped], x[~dropped] * scale, rtol=0, atol=0)


def test_the_rate_is_rounded_to_two_to_the_minus_fifteen():
    assert keep_scale(0.2) == 32768 / (32768 - 6554)
    assert keep_scale(1e-6) == 1.0  # rounds to 0: nothing dropped
    assert bool((keep_bits(torch.Size([10_000]), 1e-6, torch.float32) == -1).all())
    # the extremes of the 15-bit draw: a rate of 2**-15 drops about one in 32768
    torch.manual_seed(1)
    bits = keep_bits(torch.Size([2_000_000]), 2**-15, torch.bfloat16)
    assert bits.dtype == torch.int16 and set(bits.unique().tolist()) == {-1, 0}
    assert 30 < int((bits == 0).sum()) < 95  # expected 61


def test_gradient_uses_the_forward_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 96, requires_grad=True)
    w = torch.randn(64, 96)
    y = dropout(x, 0.3)
    (y * w).sum().backward()
    kept = y != 0
    torch.testing.assert_close(x.grad, torch.where(kept, w * keep_scale(0.3), torch.zeros(())), rtol=0, atol=0)


def test_seeded_masks_repeat_and_other_seeds_differ():
    x = torch.ones(10_000)
    torch.manual_seed(7)
    a = dropout(x, 0.2)
    torch.manual_seed(7)
    b = dropout(x, 0.2)
    torch.manual_seed(8)
    c = dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_and_zero_rate_are_the_identity():
    x = torch.randn(5, 7)
    m = NanoDropout(0.5).eval()
    assert m(x) is x
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def _causal_reference(q, k, v, mask, keep, scale):
    D = q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    w = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (w * keep * scale) @ v


@pytest.mark.parametrize("padded", [False, True])
def test_attention_equals_the_fused_kernel_when_nothing_is_dropped(padded):
    torch.manual_seed(0)
    B, H, T, D = 3, 4, 17, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    mask = None
    if padded:
        key_ok = torch.ones(B, T, dtype=torch.bool)
        key_ok[1, :5] = False  # left padding: query rows at padding attend to themselves (build_attention_mask)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (causal[None] & key_ok[:, None, :] | torch.eye(T, dtype=torch.bool)[None])[:, None]
    ours = attention_with_dropout(q, k, v, mask, 1e-6)  # rounds to rate 0
    kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(ours, kernel, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_dropout_at_every_position(dtype):
    """Same seed, same mask: the written-out path against softmax, mask, scale and matmul done by hand."""
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 33, 16
    q, k, v = (torch.randn(B, H, T, D).to(dtype) for _ in range(3))
    torch.manual_seed(5)
    ours = attention_with_dropout(q, k, v, None, 0.25)
    torch.manual_seed(5)
    keep = keep_bits(torch.Size([B, H, T, T]), 0.25, dtype) != 0
    ref = _causal_reference(q.double(), k.double(), v.double(), None, keep, keep_scale(0.25))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-2, atol=4e-2)
    torch.testing.assert_close(ours.double(), ref, **tol)
    # a query never sees a later key, dropped or not: changing the last value moves only the last row
    v2 = v.clone()
    v2[:, :, -1] += 10
    torch.manual_seed(5)
    moved = attention_with_dropout(q, k, v2, None, 0.25)
    assert torch.equal(moved[:, :, :-1], ours[:, :, :-1])


def test_model_trains_with_the_cpu_path_and_its_gradients_match_by_hand():
    cfg = NanoConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.2)
    torch.manual_seed(0)
    model = NanoLM(cfg).train()
    assert all(isinstance(m, NanoDropout) for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.randint(50, (4, 16))
    torch.manual_seed(3)
    a = model(ids)
    torch.manual_seed(3)
    b = model(ids)
    torch.manual_seed(4)
    c = model(ids)
    assert torch.equal(a, b) and not torch.equal(a, c)  # dropout is on, and seeded
    model.set_dropout(0.0)
    d = model(ids)
    model.eval()
    torch.testing.assert_close(d, model(ids), rtol=0, atol=0)
