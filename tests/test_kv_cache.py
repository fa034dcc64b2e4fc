"""The KV cache is an optimisation, never a different model: every cached path equals the plain forward.

Each path (one shared write position, per-row slots; prefill in one piece or in chunks; then decoding) is
compared on hidden states and logits at every real position, for both position encodings, then on 64 greedy
tokens. The model has 4 layers: with one layer a non-causal prefill still gives the right last position and
the right cached keys, so a 1-layer test cannot see a missing causal mask.
"""

from __future__ import annotations

import pytest
import torch

from neuraflux.model import NanoConfig, NanoLM, generate
from neuraflux.model.nano import KVCache

V, POSITIONS, STEPS = 61, 96, 64


def random_lm(position_encoding: str, scale: float) -> NanoLM:
    """A random 4-layer model with its matrices scaled up: GPT-2's 0.02 init gives near-uniform logits, and
    greedy decoding then repeats one token, which agrees with anything."""
    torch.manual_seed(0)
    m = NanoLM(
        NanoConfig(
            vocab_size=V,
            block_size=32,
            max_position_embeddings=POSITIONS,
            n_layer=4,
            n_head=4,
            n_embd=64,
            dropout=0.0,
            position_encoding=position_encoding,
        )
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return m


@pytest.fixture(params=["learned", "rope"])
def model(request):
    return random_lm(request.param, scale=8.0)  # logits within about +-30: float32 noise stays under 1e-5


@pytest.fixture(params=["learned", "rope"])
def sharp_model(request):
    return random_lm(request.param, scale=16.0)  # greedy continuations of 9-20 distinct tokens in 64


def batch(lengths: list[int], width: int, side: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths padded to `width` on `side`: ids (B, width), mask (B, width)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.randint(1, V, (n,), generator=g)
        mask[i, cols] = True
    return ids, mask


def shared_cache_forward(model: NanoLM, ids, mask, chunks: list[int]) -> torch.Tensor:
    """Hidden states (B, T, C) of `ids`, fed into one shared-position cache chunk by chunk."""
    B, T = ids.shape
    cache = KVCache.empty(model.config, B, T, ids.device, torch.float32)
    out, start = [], 0
    for n in chunks:
        stop = start + n
        out.append(model.transformer(ids[:, start:stop], None if mask is None else mask[:, :stop], kv_cache=cache))
        start = stop
    assert start == T and cache.length == T
    return torch.cat(out, dim=1)


def split(total: int, prefill: list[int]) -> list[int]:
    """Chunk sizes: the prefill pieces, then one token at a time (decoding) up to `total`."""
    return prefill + [1] * (total - sum(prefill))


def assert_same(cached: torch.Tensor, plain: torch.Tensor, model: NanoLM, real: torch.Tensor | None) -> None:
    """Hidden states and logits equal at every real position."""
    if real is not None:
        cached, plain = cached[real], plain[real]  # (N, C) rows at real positions
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.lm_head(cached), model.lm_head(plain), atol=1e-5, rtol=1e-5)


# prompt lengths, padding side, prefill pieces (the rest of the 20 positions is decoded one token at a time)
CASES = {
    "batch 1, one piece": ([12], "left", [12]),
    "batch 1, chunks": ([12], "left", [5, 4, 3]),
    "batch 4 equal lengths, one piece": ([12, 12, 12, 12], "left", [12]),
    "batch 4 equal lengths, chunks": ([12, 12, 12, 12], "left", [7, 5]),
    "batch 4 left-padded, one piece": ([12, 3, 9, 1], "left", [12]),
    "batch 4 left-padded, chunks": ([12, 3, 9, 1], "left", [2, 6, 4]),
    "batch 4 right-padded, one piece": ([12, 3, 9, 1], "right", [12]),
    "batch 4 right-padded, chunks": ([12, 3, 9, 1], "right", [4, 8]),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_shared_cache_equals_the_plain_forward_at_every_position(model, case):
    lengths, side, prefill = CASES[case]
    prompt, prompt_mask = batch(lengths, 12, side)
    extra = torch.randint(1, V, (len(lengths), 8), generator=torch.Generator().manual_seed(2))  # 8 decoded tokens
    ids = torch.cat([prompt, extra], dim=1)  # (B, 20): a right-padded row has its padding in the middle
    mask = torch.cat([prompt_mask, torch.ones_like(extra, dtype=torch.bool)], dim=1)
    padded = not bool(mask.all())
    plain = model.transformer(ids, mask if padded else None)
    cached = shared_cache_forward(model, ids, mask if padded else None, split(20, prefill))
    assert_same(cached, plain, model, mask if padded else None)


def row_view(cache: KVCache, row: int) -> KVCache:
    """Row `row` of a slot cache as a one-row cache writing into the shared storage (the server's prefill)."""
    return KVCache(
        [k[row : row + 1] for k in cache.keys],
        [v[row : row + 1] for v in cache.values],
        positions=cache.positions[row : row + 1],
    )


PIECES = {"one piece": lambda n: [n], "chunks": lambda n: [n // 2, n - n // 2], "token by token": lambda n: [1] * n}


@pytest.mark.parametrize("pieces", PIECES)
@torch.no_grad()
def test_slot_cache_equals_the_plain_forward_at_every_position(model, pieces):
    # Four requests of different lengths, each prefilled into its own row (the server's path), then decoded
    # together; row 3 held a longer request before, whose stale keys it must not see.
    lengths = [12, 5, 9, 2]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in lengths]
    extra = torch.randint(1, V, (4, 8), generator=g)  # 8 decoded tokens per row
    cache = KVCache.slots(model.config, 4, 40, torch.device("cpu"), torch.float32)
    model.transformer(torch.randint(1, V, (1, 30), generator=g), kv_cache=row_view(cache, 3))  # stale occupant
    cache.positions[3] = 0
    hidden: list[list[torch.Tensor]] = [[] for _ in lengths]
    for row, p in enumerate(prompts):
        start = 0
        for n in PIECES[pieces](len(p)):
            hidden[row].append(model.transformer(p[None, start : start + n], kv_cache=row_view(cache, row))[0])
            start += n
    for step in range(8):
        h = model.transformer(extra[:, step : step + 1], kv_cache=cache)  # (4, 1, C): one shared decoding step
        for row in range(4):
            hidden[row].append(h[row])
    assert cache.positions.tolist() == [n + 8 for n in lengths]
    for row, p in enumerate(prompts):
        plain = model.transformer(torch.cat([p, extra[row]])[None])[0]
        assert_same(torch.cat(hidden[row]), plain, model, None)


GREEDY_CASES = {
    "batch 1": ([11], "left"),
    "batch 4 equal lengths": ([11, 11, 11, 11], "left"),
    "batch 4 mixed, left-padded": ([11, 4, 8, 1], "left"),
    "batch 4 mixed, right-padded": ([11, 4, 8, 1], "right"),
}


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_decoding_with_and_without_the_cache_is_token_identical(sharp_model, case):
    model = sharp_model
    lengths, side = GREEDY_CASES[case]
    ids, mask = batch(lengths, 11, side, seed=4)
    kw = dict(temperature=0.0, attention_mask=mask)
    cached = generate(model, ids, STEPS, use_kv_cache=True, **kw)
    plain = generate(model, ids, STEPS, use_kv_cache=False, **kw)
    assert cached.shape == (len(lengths), 11 + STEPS)
    assert torch.equal(cached, plain)
    assert all(len(set(row[11:].tolist())) > 4 for row in plain)  # varied text: agreement is not trivial
