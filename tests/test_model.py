import math

import pytest
import torch

from neuraflux.model import NanoConfig, NanoLM, filter_logits, generate, sample_next

SMALL = dict(vocab_size=97, block_size=32, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(params=["learned", "rope"])
def model(request):
    """Every test taking `model` runs for both position encodings."""
    torch.manual_seed(0)
    return NanoLM(NanoConfig(**SMALL, position_encoding=request.param)).eval()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=30, n_head=4), "n_embd (30) must be divisible by model.n_head (4)"),
        (dict(n_layer=0), "model.n_layer must be a positive integer"),
        (dict(dropout=1.0), "model.dropout must be in [0, 1)"),
        (dict(block_size=128, max_position_embeddings=64), "model.block_size (128) must be <= model.max_position"),
        (dict(vocab_size=-5), "model.vocab_size must be a positive integer"),
        (dict(position_encoding="alibi"), "model.position_encoding must be one of ['learned', 'rope'], got 'alibi'"),
        (dict(position_encoding="rope", n_embd=36, n_head=4), "(36 / 4 = 9) must be even"),
        (dict(position_encoding="rope", rope_theta=0.0), "model.rope_theta must be > 0"),
    ],
)
def test_config_rejects_nonsense(overrides, message):
    with pytest.raises(ValueError) as err:
        NanoConfig(**{**SMALL, **overrides})
    assert message in str(err.value)


def test_nano_preset_parameter_count():
    # per layer: qkv 384*1152+1152, proj 384*384+384, fc 384*1536+1536, proj 1536*384+384, two LayerNorms 4*384
    #   = 442,752 + 147,840 + 591,360 + 590,208 + 1,536 = 1,773,696; six layers = 10,642,176
    # embeddings: tokens 10,000*384 = 3,840,000, positions 512*384 = 196,608; final LayerNorm 768
    # head tied to the token embedding: 0 extra. Total 14,679,552 + 4,608? -> computed below term by term.
    layer = (384 * 1152 + 1152) + (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384) + 4 * 384
    expected = 6 * layer + 10_000 * 384 + 512 * 384 + 2 * 384
    m = NanoLM(NanoConfig(vocab_size=10_000, block_size=256, max_position_embeddings=512))
    assert m.num_parameters() == expected == 14_684_160
    assert m.lm_head.weight is m.transformer.embeddings.token.weight


def test_forward_shape_and_causality(model):
    ids = torch.randint(0, 97, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 97)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    # positions before the change cannot see it
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6])
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


def test_left_padding_matches_unpadded(model):
    ids = torch.randint(1, 97, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    torch.testing.assert_close(model(padded, mask)[:, 3:], model(ids), atol=1e-5, rtol=1e-5)


def _prompts():
    torch.manual_seed(1)
    rows = [torch.randint(1, 97, (n,)) for n in (5, 9, 2)]
    T = 9
    left = torch.zeros(3, T, dtype=torch.long)
    right = torch.zeros(3, T, dtype=torch.long)
    lmask = torch.zeros(3, T, dtype=torch.bool)
    rmask = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        left[i, T - len(r) :], lmask[i, T - len(r) :] = r, True
        right[i, : len(r)], rmask[i, : len(r)] = r, True
    return rows, left, lmask, right, rmask


def test_greedy_with_and_without_cache_agree_on_mixed_lengths(model):
    rows, left, lmask, right, rmask = _prompts()
    with_cache = generate(model, left, 12, temperature=0, attention_mask=lmask, use_kv_cache=True)
    without = generate(model, left, 12, temperature=0, attention_mask=lmask, use_kv_cache=False)
    assert torch.equal(with_cache, without)
    for i, r in enumerate(rows):  # each row equals decoding that prompt alone
        alone = generate(model, r[None], 12, temperature=0)
        assert torch.equal(alone[0, len(r) :], with_cache[i, -12:])


def test_right_padded_prompts_come_back_right_padded(model):
    rows, left, lmask, right, rmask = _prompts()
    out = generate(model, right, 12, temperature=0, attention_mask=rmask)
    ref = generate(model, left, 12, temperature=0, attention_mask=lmask)
    for i, r in enumerate(rows):
        assert torch.equal(out[i, : len(r)], r)
        assert torch.equal(out[i, len(r) : len(r) + 12], ref[i, -12:])
        assert bool((out[i, len(r) + 12 :] == 0).all())


def test_eos_stops_row_and_pads_after(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = generate(model, ids, 6, temperature=0)
    eos = int(free[0, 4])  # row 0's first new token becomes "eos"
    out = generate(model, ids, 6, temperature=0, eos_token_id=eos)
    assert out[0, 4] == eos and bool((out[0, 5:] == 0).all())
    row1 = free[1, 4:].tolist()
    n = row1.index(eos) + 1 if eos in row1 else len(row1)  # row 1 runs until its own eos
    assert out[1, 4 : 4 + n].tolist() == row1[:n]


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert int(kept.sum()) == 2 and bool(kept[0, 1:4].sum() == 2)


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.8))
    # 0.5 < 0.8, 0.5 + 0.3 = 0.8 reaches p: the first two stay
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(probs.log(), top_p=0.1)).sum() == 1


def test_temperature_zero_is_argmax_and_sampling_is_seeded():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    a = sample_next(logits, 1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    top5 = logits.topk(5).indices
    assert all(int(a[i]) in top5[i].tolist() for i in range(4))


def test_generation_length_beyond_positions_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        generate(model, torch.ones(1, 60, dtype=torch.long), 10)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = NanoLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(loaded.eval()(ids), model(ids))
    assert loaded.lm_head.weight is loaded.transformer.embeddings.token.weight


def test_load_names_vocab_mismatch(model, tmp_path):
    model.save_pretrained(tmp_path)
    other = NanoLM(NanoConfig(**{**model.config.to_dict(), "vocab_size": 120}))
    from safetensors.torch import load_file

    from neuraflux.model.nano import load_state_checked

    with pytest.raises(ValueError, match="vocabulary size 97 does not match the config's model.vocab_size=120"):
        load_state_checked(other, load_file(str(tmp_path / "model.safetensors")), "x")


def test_attention_maps_are_causal_distributions(model):
    maps = model.attention_maps(torch.randint(0, 97, (1, 6)))
    assert len(maps) == 2 and maps[0].shape == (1, 4, 6, 6)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 4, 6))
    assert float(maps[1].triu(1).abs().max()) == 0.0


def test_attention_maps_match_fused_path(model):
    ids = torch.randint(0, 97, (2, 6))
    hidden, _ = model.transformer(ids, need_weights=True)
    torch.testing.assert_close(hidden, model.transformer(ids), atol=1e-5, rtol=1e-5)


def test_flops_per_token_is_six_n_plus_attention():
    m = NanoLM(NanoConfig(**SMALL))
    n = m.num_parameters() - 64 * 32  # without position embeddings
    assert m.flops_per_token(32) == 6 * n + 12 * 2 * 32 * 32


def test_get_attention_maps_from_text_with_the_saved_tokenizer(model, tmp_path):
    from neuraflux.tokenizer import NanoTokenizer

    tok = NanoTokenizer.train(["abc def"], 0, mode="char")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.get_attention_maps("abc")
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    loaded = NanoLM.from_pretrained(tmp_path)
    maps = loaded.get_attention_maps("abc d")
    assert len(maps) == 2 and maps[0].shape == (4, 5, 5)


def test_right_padding_needs_no_mask_and_matches_unpadded(model):
    ids = torch.randint(1, 97, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 7 + [False] * 3])
    torch.testing.assert_close(model(padded, mask)[:, :7], model(ids), atol=1e-5, rtol=1e-5)


def _slot_view(cache, row: int):
    """Row `row` of a slot cache as a one-row cache writing into the shared storage."""
    from neuraflux.model.nano import KVCache

    return KVCache(
        keys=[k[row : row + 1] for k in cache.keys],
        values=[v[row : row + 1] for v in cache.values],
        positions=cache.positions[row : row + 1],
    )


def test_slot_cache_decodes_requests_of_different_lengths_together_as_if_alone(model):
    # Three prompts of lengths 5, 9 and 3; the third joins after two shared steps, into a slot whose cache
    # still holds 20 stale positions from an earlier, longer request. Greedy tokens must equal decoding alone.
    from neuraflux.model.nano import KVCache

    torch.manual_seed(1)
    prompts = [torch.randint(1, 97, (n,)) for n in (5, 9, 3)]
    steps = 6
    alone = [generate(model, p[None], steps, temperature=0.0)[0, len(p) :].tolist() for p in prompts]

    w = model.lm_head.weight
    cache = KVCache.slots(model.config, 3, 32, w.device, w.dtype)
    with torch.no_grad():
        model.transformer(torch.randint(1, 97, (1, 20)), kv_cache=_slot_view(cache, 2))  # stale occupant
        cache.positions[2] = 0  # the slot is freed; its old keys stay in memory
        out: list[list[int]] = [[], [], []]
        for row in (0, 1):
            h = model.transformer(prompts[row][None], kv_cache=_slot_view(cache, row))
            out[row].append(int(model.lm_head(h[:, -1]).argmax(-1)))
        for step in range(steps + 2):
            if step == 2:
                h = model.transformer(prompts[2][None], kv_cache=_slot_view(cache, 2))
                out[2].append(int(model.lm_head(h[:, -1]).argmax(-1)))
            live = 3 if step >= 2 else 2
            tokens = torch.tensor([[out[r][-1]] for r in range(live)])  # (live, 1)
            logits = model.lm_head(model.transformer(tokens, kv_cache=cache.rows(live))[:, -1])  # (live, V)
            for r in range(live):
                if len(out[r]) < steps:
                    out[r].append(int(logits[r].argmax()))
    assert out == alone
    assert cache.positions.tolist() == [5 + 8, 9 + 8, 3 + 6]  # every shared step advanced each live row by one


def test_slot_mask_hides_keys_past_each_rows_end():
    from neuraflux.model.nano import slot_attention_mask

    m = slot_attention_mask(torch.tensor([0, 2]), query_length=2, key_length=4)  # (2, 1, 2, 4)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert m[1, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_slot_cache_refuses_to_run_past_the_row_limit(model):
    from neuraflux.model.nano import KVCache

    cache = KVCache.slots(model.config, 2, 8, torch.device("cpu"), torch.float32)
    cache.positions += torch.tensor([3, 7])
    with pytest.raises(ValueError, match="a cache row would hold 9 tokens, over its limit of 8"):
        model.transformer(torch.ones(2, 2, dtype=torch.long), kv_cache=cache)


def test_slot_cache_starts_zeroed_so_masked_keys_cannot_hold_nan(model):
    from neuraflux.model.nano import KVCache

    cache = KVCache.slots(model.config, 2, 8, torch.device("cpu"), torch.float32)
    assert cache.positions.tolist() == [0, 0]
    assert all(float(t.abs().sum()) == 0.0 for t in cache.keys + cache.values)


def test_init_is_gpt2s_as_in_the_reference_recipe():
    # nanoGPT/GPT-2: every Linear and Embedding N(0, 0.02); the two residual projections per layer
    # N(0, 0.02 / sqrt(2 * n_layer)) = 0.02 / sqrt(8) = 0.00707 for 4 layers; biases 0; LayerNorm gains 1.
    torch.manual_seed(0)
    m = NanoLM(NanoConfig(vocab_size=512, block_size=64, max_position_embeddings=256, n_layer=4, n_head=4, n_embd=256))
    for name, p in m.named_parameters():
        if name.endswith("proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.03), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.03), name
        elif "ln" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert torch.equal(p, torch.zeros_like(p)), name
        if p.dim() == 2:
            assert abs(p.mean().item()) < 0.001, name


def test_rope_turns_each_pair_of_dimensions_by_position_times_frequency():
    from neuraflux.model.nano import apply_rope, rope_angles

    # D = 4: pairs (0, 2) and (1, 3) turn by p * 100^0 and p * 100^(-1/2) = p / 10 radians
    x = torch.tensor([1.0, 0.0, 0.0, 2.0])[None, None, None].expand(1, 1, 2, 4)  # (B, H, T, D), positions 0 and 3
    out = apply_rope(x, rope_angles(torch.tensor([[0, 3]]), head_dim=4, theta=100.0))[0, 0]
    assert torch.allclose(out[0], x[0, 0, 0])  # position 0 does not turn
    a, b = 3.0, 0.3
    expected = torch.tensor([math.cos(a), -2.0 * math.sin(b), math.sin(a), 2.0 * math.cos(b)])
    assert torch.allclose(out[1], expected, atol=1e-6)


def test_rope_model_depends_on_relative_positions_only():
    torch.manual_seed(0)
    rope = NanoLM(NanoConfig(**SMALL, position_encoding="rope")).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))
    base = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        a = rope.transformer(ids, position_ids=base)
        b = rope.transformer(ids, position_ids=base + 17)
    assert torch.allclose(a, b, atol=1e-5)
    assert rope.transformer.embeddings.position is None
    learned = NanoLM(NanoConfig(**SMALL))
    assert learned.num_parameters() - rope.num_parameters() == SMALL["max_position_embeddings"] * SMALL["n_embd"]
