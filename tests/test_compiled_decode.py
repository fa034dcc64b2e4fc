"""The static-shape decode step (model/generation.py) and its torch.compile'd form: logits equal to the uncached
forward at every position, tokens equal to eager decoding, and the one pairing that is refused."""

import pytest
import torch

from neuraflux.model import NanoConfig, NanoLM, generate
from neuraflux.model.generation import check_compilable, compiled_decode_step, key_bucket, static_decode_step
from neuraflux.model.nano import KVCache

PROMPT = 7


def tiny(position_encoding: str, seed: int = 0, positions: int = 64) -> NanoLM:
    torch.manual_seed(seed)
    config = NanoConfig(
        vocab_size=64, block_size=32, max_position_embeddings=positions, n_layer=2, n_head=2, n_embd=32,
        position_encoding=position_encoding,
    )  # fmt: skip
    return NanoLM(config).eval()


@torch.no_grad()
def stepped_logits(model: NanoLM, ids: torch.Tensor, step, bucketed: bool = False) -> torch.Tensor:
    """Logits for positions PROMPT-1 .. T-2 of ids: an eager prefill of the first PROMPT tokens into a slot cache of
    the model's whole length, then one `step` per following token (teacher forcing, so every position is compared,
    not one greedy path); `bucketed`: each step attends over `key_bucket` slots, as generation's compiled steps do."""
    capacity = model.config.max_position_embeddings
    cache = KVCache.slots(model.config, ids.shape[0], capacity, "cpu", torch.float32)
    out = [model.lm_head(model.transformer(ids[:, :PROMPT], kv_cache=cache)[:, -1])]
    for t in range(PROMPT, ids.shape[1] - 1):
        key_length = key_bucket(t + 1, capacity) if bucketed else None
        out.append(step(model, ids[:, t : t + 1], cache.positions, cache.keys, cache.values, key_length))
        cache.positions += 1
    return torch.stack(out, dim=1)  # (B, T - PROMPT, V)


def test_key_buckets_by_hand():
    assert [key_bucket(n, 512) for n in (1, 64, 65, 128, 129, 300, 512)] == [64, 64, 128, 128, 256, 512, 512]
    assert key_bucket(300, 320) == 320  # never past the capacity


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
def test_the_static_step_gives_the_uncached_logits_at_every_position(position_encoding):
    model = tiny(position_encoding)
    ids = torch.randint(5, 64, (3, 30))
    with torch.no_grad():
        want = model(ids)[:, PROMPT - 1 : -1]
    got = stepped_logits(model, ids, static_decode_step)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("position_encoding", ["learned", "rope"])
def test_the_step_over_key_buckets_gives_the_uncached_logits_at_every_position(position_encoding):
    """A 256-slot cache read through the first 64, then 128, then 256 slots as the sequence grows past each."""
    model = tiny(position_encoding, positions=256)
    ids = torch.randint(5, 64, (2, 150))
    with torch.no_grad():
        want = model(ids)[:, PROMPT - 1 : -1]
    got = stepped_logits(model, ids, static_decode_step, bucketed=True)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.slow
def test_compiled_decoding_equals_eager():
    """On an int8 model (rotary positions, model/quantize.py's fused kernels): the compiled step must keep the
    bfloat16 roundings around the fused int8 matmul where eager has them (inductor may fuse casts away), and int8 is
    where compiling went wrong before (int8-dynamic); the float path is the same step with plain tensors. ~20 s of
    compiling."""
    pytest.importorskip("torchao")
    from neuraflux.model.quantize import quantize_model

    model = quantize_model(tiny("rope", seed=1, positions=128), "int8")
    ids = torch.randint(5, 64, (2, 90))  # past 64 positions: two key buckets, two compilations
    eager = stepped_logits(model, ids, static_decode_step, bucketed=True)
    compiled = stepped_logits(model, ids, compiled_decode_step(), bucketed=True)
    # the same arithmetic, fused: float rounding, which can move one of the int8 matmul's bfloat16 roundings by a
    # step (model/quantize.py), so the bound is one bfloat16 step of the largest logit
    assert (compiled - eager).abs().max().item() < 2**-7 * eager.abs().max().item()
    prompt = ids[:, :PROMPT]
    assert torch.equal(
        generate(model, prompt, 80, temperature=0, compile=True), generate(model, prompt, 80, temperature=0)
    )
    # sampling draws the same tokens from the same generator state
    a = generate(model, prompt, 80, temperature=1.0, generator=torch.Generator().manual_seed(3), compile=True)
    b = generate(model, prompt, 80, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_compiling_an_int8_dynamic_model_is_refused_by_name():
    pytest.importorskip("torchao")
    from neuraflux.model.quantize import quantize_model

    model = quantize_model(tiny("learned"), "int8-dynamic")
    with pytest.raises(ValueError, match="compiled decoding of an int8-dynamic model computes wrong logits"):
        check_compilable(model)
    with pytest.raises(ValueError, match="int8-dynamic"):
        generate(model, torch.tensor([[5, 6, 7]]), 3, temperature=0, compile=True)
