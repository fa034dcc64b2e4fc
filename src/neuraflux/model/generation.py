"""Generation, written once: rollouts, evaluation, the CLI and the server all sample through here."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from neuraflux.model.nano import KVCache, NanoLM

# A compiled decode step is traced for one (batch, cache capacity, key length): capacities are rounded up to this
# many positions so that prompts of different lengths share a compilation, and each step attends over the first
# `key_bucket` slots, a power-of-two multiple of it, so attention reads at most twice the keys it needs with a few
# compilations (64, 128, 256, ... up to the capacity) instead of the whole capacity on every step.
CAPACITY_STEP = 64


def key_bucket(length: int, capacity: int) -> int:
    """The key length a compiled step attends over to cover `length` cached positions: CAPACITY_STEP times the
    smallest power of two that reaches it, at most `capacity`."""
    bucket = CAPACITY_STEP
    while bucket < length:
        bucket *= 2
    return min(bucket, capacity)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask (B, V) logits to -inf outside the top-k set and the top-p nucleus.

    top-k keeps exactly k tokens even when several share the k-th value (a threshold would keep them all).
    top-p keeps the smallest set of most likely tokens whose probability reaches p; the best token always stays.
    """
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        if top_k < logits.shape[-1]:
            idx = logits.topk(top_k, dim=-1).indices
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
            logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        if top_p < 1.0:
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the mass before it already reaches p
            drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
            drop_sorted[..., 0] = False
            drop = torch.zeros_like(drop_sorted).scatter_(-1, sorted_idx, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids; temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int):
    """Move each row's real tokens to the right end, so all rows end together and decode in lockstep."""
    lengths = attention_mask.long().sum(-1)  # (B,)
    B, T = input_ids.shape
    cols = torch.arange(T, device=input_ids.device)[None, :]
    # source index for each destination column: real tokens land in the last `length` columns
    src = (cols - (T - lengths)[:, None]).clamp(min=0)
    real_first = attention_mask.long().argmax(-1)  # first real token (0 for right padding)
    src = (src + real_first[:, None]).clamp(max=T - 1)
    new_mask = cols >= (T - lengths)[:, None]
    new_ids = torch.where(new_mask, input_ids.gather(1, src), torch.full_like(input_ids, pad_token_id))
    return new_ids, new_mask


def ends_with_padding(attention_mask: torch.Tensor) -> bool:
    """Some row's last position is padding: the prompts are right-padded, not left-padded."""
    return not bool(attention_mask[:, -1].all())


def static_decode_step(
    model: NanoLM,
    token: torch.Tensor,
    positions: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    key_length: int | None = None,
) -> torch.Tensor:
    """One decoding step whose shapes are fixed by (batch, capacity, key_length), so torch.compile traces it once per
    key length: token (B, 1) is written at positions (B,) of a per-row cache of fixed capacity (`KVCache.slots`),
    every query attends over the first `key_length` slots (None: the whole capacity; it must exceed every position)
    with the slots after its own position masked -> logits (B, V). Does not advance `positions`."""
    key_length = keys[0].shape[2] if key_length is None else key_length
    hidden, _ = model.transformer.forward_at(token, positions, keys, values, key_length=key_length)
    return model.lm_head(hidden[:, -1])


_compiled_step = None


def check_compilable(model: NanoLM) -> None:
    """ValueError for a model whose compiled step is known to compute wrong numbers: torchao 0.18's int8-dynamic
    tensors under inductor on the CPU give logits off by ~20 where the eager step is within 0.2 of the uncached
    forward (`python bench/quantize_quality.py --run RUN` measures it), so that pair is refused rather than decoded
    into garbage."""
    if getattr(model, "quantization", None) == "int8-dynamic":
        raise ValueError(
            "compiled decoding of an int8-dynamic model computes wrong logits (torchao 0.18, CPU): decode it without "
            "compile, or quantize to int8"
        )


def compiled_decode_step():
    """`static_decode_step` under torch.compile, built on first use (dynamo re-traces it per model and shape)."""
    global _compiled_step
    if _compiled_step is None:
        import torch._dynamo.config as dynamo_config

        # one graph per (model, batch, capacity, key bucket): a process that decodes two models at two batch sizes
        # holds 16, past dynamo's default of 8 per function, after which it would decode eagerly without a word
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _compiled_step = torch.compile(static_decode_step, dynamic=False)
    return _compiled_step


@torch.inference_mode()
def generate_stream(
    model: NanoLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    use_kv_cache: bool = True,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) per decoding step for left-padded (or unpadded) prompts.

    Rows that have finished keep yielding the pad id. Stops when every row has finished or after
    max_new_tokens steps. `compile`: after an eager prefill, each step is `static_decode_step` under torch.compile
    (the first call per batch size and capacity compiles, seconds); it pays where eager steps spend their time
    between kernels, e.g. the int8 model's small per-layer conversions (docs/BENCHMARKS.md). Padded prompts decode
    eagerly either way.
    """
    config = model.config
    B, T0 = input_ids.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if T0 + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=input_ids.device,
        dtype=torch.long,
    )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    # A padding mask is carried only when some row is padded; it grows by one column a step.
    padded = not bool(attention_mask.all())
    mask = attention_mask.bool() if padded else None
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    if compile and use_kv_cache and mask is None:
        check_compilable(model)
        logits, advance = _compiled_decoder(model, input_ids, max_new_tokens)
    else:
        logits, advance = _eager_decoder(model, input_ids, max_new_tokens, mask, use_kv_cache)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, config.pad_token_id)
        if eos.numel():
            finished = finished | torch.isin(token, eos)
        yield token, finished
        if bool(finished.all()):
            return
        logits = advance(token)


Decoder = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _eager_decoder(model: NanoLM, input_ids, max_new_tokens: int, mask, use_kv_cache: bool) -> Decoder:
    """The prompt's next-token logits (B, V), and `advance`: the next tokens (B,) -> their next-token logits. With
    a KV cache each step reads one new position; without, the whole sequence again. A padding mask grows a column a
    step."""
    B, T0 = input_ids.shape
    head, seq = model.lm_head, input_ids
    cache = None
    if use_kv_cache:
        cache = KVCache.empty(model.config, B, T0 + max_new_tokens, head.weight.device, head.weight.dtype)

    def advance(token: torch.Tensor) -> torch.Tensor:
        nonlocal mask, seq
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=mask.device)], dim=1)
        if cache is not None:
            return head(model.transformer(token[:, None], mask, kv_cache=cache)[:, -1])
        seq = torch.cat([seq, token[:, None]], dim=1)
        return head(model.transformer(seq, mask)[:, -1])

    return head(model.transformer(input_ids, mask, kv_cache=cache)[:, -1]), advance  # (B, V): last position only


def _compiled_decoder(model: NanoLM, input_ids, max_new_tokens: int) -> Decoder:
    """As `_eager_decoder` for unpadded prompts, each step the compiled `static_decode_step` over a slot cache whose
    capacity is rounded up to CAPACITY_STEP positions (one compilation serves prompts of different lengths), attending
    over `key_bucket` slots."""
    config, (B, T0) = model.config, input_ids.shape
    capacity = min(config.max_position_embeddings, -(-(T0 + max_new_tokens) // CAPACITY_STEP) * CAPACITY_STEP)
    weight = model.lm_head.weight
    cache = KVCache.slots(config, B, capacity, weight.device, weight.dtype)
    step = compiled_decode_step()
    length = T0  # every row's, unpadded: the positions cached so far

    def advance(token: torch.Tensor) -> torch.Tensor:
        nonlocal length
        length += 1
        logits = step(model, token[:, None], cache.positions, cache.keys, cache.values, key_bucket(length, capacity))
        cache.positions += 1
        return logits

    return model.lm_head(model.transformer(input_ids, kv_cache=cache)[:, -1]), advance  # prefill: positions -> T0


def generate(
    model: NanoLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    use_kv_cache: bool = True,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Prompt + new tokens as (B, T0 + n) with n <= max_new_tokens.

    Prompts may be left- or right-padded (give `attention_mask`); the output keeps the input's padding side:
    right-padded rows come back as prompt, continuation, then padding. After a row's eos it is padded.
    """
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.bool()
    right = ends_with_padding(attention_mask)
    ids, mask = to_left_padding(input_ids, attention_mask, pad) if right else (input_ids, attention_mask)
    was_training = model.training
    model.eval()
    try:
        steps = [
            tok
            for tok, _ in generate_stream(
                model,
                ids,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                eos_token_id,
                mask,
                use_kv_cache,
                generator,
                compile,
            )
        ]
    finally:
        model.train(was_training)
    new = torch.stack(steps, dim=1) if steps else ids.new_empty(ids.shape[0], 0)
    if not right:
        return torch.cat([ids, new], dim=1)
    # Re-pack as prompt + continuation at the left, padding at the right.
    new_mask = new != pad
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, new_mask], dim=1)
    order = torch.sort((~full_mask).long(), dim=1, stable=True).indices  # real tokens first, order kept
    return torch.where(
        torch.gather(full_mask, 1, order), torch.gather(full_ids, 1, order), torch.full_like(full_ids, pad)
    )
