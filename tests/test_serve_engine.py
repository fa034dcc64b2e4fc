"""The continuous-batching engine on a tiny random model: batched decoding equals decoding alone, limits, faults."""

from __future__ import annotations

import queue
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the web stack: pip install -e '.[serve]'")

from neuraflux.chat import Message, render_prompt  # noqa: E402
from neuraflux.model import NanoConfig, NanoLM, generate  # noqa: E402
from neuraflux.serve.engine import DoneEvent, Engine, ErrorEvent, GenerationRequest, TokenEvent  # noqa: E402
from neuraflux.serve.protocol import Sampling, ServeError  # noqa: E402
from neuraflux.tokenizer import NanoTokenizer  # noqa: E402

torch.set_num_threads(1)

GREEDY = Sampling(0.0, None, None)
ALPHABET = "abcdefghijklmnopqrstuvwxyz ?.,"


def tiny_lm(seed: int = 0, max_positions: int = 96, n_layer: int = 1) -> tuple[NanoLM, NanoTokenizer]:
    """A random model (1 layer unless asked) over a character vocabulary that never emits a special token when greedy.

    The special tokens' (and <|unk|>'s) embedding rows are zero, so their logits are exactly 0 while the best
    of the ~30 character logits is positive: every greedy token is one printable character, one text event.
    """
    tok = NanoTokenizer.train([ALPHABET], vocab_size=0, mode="char")
    torch.manual_seed(seed)
    cfg = NanoConfig(
        vocab_size=tok.vocab_size,
        block_size=64,
        max_position_embeddings=max_positions,
        n_layer=n_layer,
        n_head=2,
        n_embd=16,
    )
    model = NanoLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(30)  # GPT-2's 0.02 init gives near-uniform logits and one repeated character; vary the text
        for i in range(tok.token_to_id("<|unk|>") + 1):
            model.transformer.embeddings.token.weight[i].zero_()
    return model, tok


def alone(model: NanoLM, tok: NanoTokenizer, ids: list[int], n: int) -> str:
    """The greedy continuation of one prompt decoded by itself, without a KV cache: the reference."""
    out = generate(model, torch.tensor([ids]), n, temperature=0.0, use_kv_cache=False)[0, len(ids) :]
    return tok.decode(out.tolist(), skip_special_tokens=True)


def slow_down(model: NanoLM, seconds: float) -> None:
    """Make every forward take at least `seconds`, so a test can act while a request is still decoding."""
    model.transformer.register_forward_pre_hook(lambda *_: time.sleep(seconds))


class Collector:
    """A sink that records events; `wait` blocks until the request's last event."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        self.seen: list = []

    def __call__(self, event) -> None:
        self.events.put(event)

    def next(self, timeout: float = 10.0):
        event = self.events.get(timeout=timeout)
        self.seen.append(event)
        return event

    def wait(self, timeout: float = 10.0):
        while True:
            event = self.next(timeout)
            if not isinstance(event, TokenEvent):
                return event

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.seen if isinstance(e, TokenEvent))


def chat_ids(tok: NanoTokenizer, question: str) -> list[int]:
    return tok.encode(render_prompt([Message("user", question)]))


@pytest.fixture
def lm():
    return tiny_lm()


def request(ids, n, **kw) -> GenerationRequest:
    return GenerationRequest(tuple(ids), n, kw.pop("sampling", GREEDY), **kw)


def test_requests_decoded_together_match_decoding_alone_and_share_steps(lm):
    model, tok = lm
    prompts = [chat_ids(tok, q) for q in ("hi", "what is the tallest tower?", "why")]  # 3 different lengths
    engine = Engine(model, tok, max_concurrent=4, max_queue=0)
    sinks = [Collector() for _ in prompts]
    for ids, sink in zip(prompts, sinks):
        engine.submit(request(ids, 8), sink)  # queued before the thread starts: all three join the first step
    engine.start()
    try:
        done = [s.wait() for s in sinks]
    finally:
        engine.stop()
    assert [s.text for s in sinks] == [alone(model, tok, ids, 8) for ids in prompts]
    assert all(d.finish_reason == "length" and d.usage.completion_tokens == 8 for d in done)
    assert done[1].usage.prompt_tokens == len(prompts[1])
    # each request's first token comes from its prefill, the other 7 from decoding steps all three shared:
    # 7 steps, not 3 * 7 = 21
    assert engine.stats().steps == 7
    assert engine.stats().tokens == 24


def test_slots_decode_64_greedy_tokens_as_the_uncached_forward_does():
    # 4 layers: with one, a prefill that ignored causality would still give the right last position and keys
    model, tok = tiny_lm(seed=1, max_positions=128, n_layer=4)
    prompts = [chat_ids(tok, q) for q in ("hi", "what is the tallest tower?", "why", "who")]  # two of equal length
    engine = Engine(model, tok, max_concurrent=4, max_queue=0)
    sinks = [Collector() for _ in prompts]
    for ids, sink in zip(prompts, sinks):
        engine.submit(request(ids, 64), sink)
    engine.start()
    try:
        done = [s.wait() for s in sinks]
    finally:
        engine.stop()
    assert all(d.usage.completion_tokens == 64 for d in done)
    assert [s.text for s in sinks] == [alone(model, tok, ids, 64) for ids in prompts]
    assert len(set(sinks[1].text)) > 4  # the text varies, so agreement is not trivial


@pytest.mark.slow
def test_a_compiled_engine_decodes_what_the_eager_one_does_across_key_buckets():
    """serve.compile: the compiled static step over 1 or 2 rows and 64 or 128 keys (4 shapes, compiled at start:
    ~25 s with an empty inductor cache), the key length growing as the requests pass 64 positions. Same texts as
    each prompt decoded alone without a cache; a request that joins mid-stream lands in the slot a finished one
    freed."""
    from torch._dynamo.utils import counters

    model, tok = tiny_lm(seed=1, max_positions=128, n_layer=2)
    prompts = [chat_ids(tok, q) for q in ("what is the tallest tower?", "why")]
    graphs = counters["stats"]["unique_graphs"]
    engine = Engine(model, tok, max_concurrent=2, max_queue=1, compile=True)
    sinks = [Collector() for _ in prompts]
    for ids, sink, n in zip(prompts, sinks, (64, 8)):
        engine.submit(request(ids, n), sink)
    engine.start()
    assert counters["stats"]["unique_graphs"] - graphs == 4  # every (rows, keys) shape, before any request decoded
    try:
        short = sinks[1].wait(timeout=120)  # the short one ends; the next request takes its slot
        late = Collector()
        engine.submit(request(chat_ids(tok, "who"), 40), late)
        done = [s.wait(timeout=120) for s in (sinks[0], late)]
    finally:
        engine.stop()
    assert [d.usage.completion_tokens for d in (done[0], short, done[1])] == [64, 8, 40]
    assert [s.text for s in sinks] == [alone(model, tok, ids, n) for ids, n in zip(prompts, (64, 8))]
    assert late.text == alone(model, tok, chat_ids(tok, "who"), 40)
    assert counters["stats"]["unique_graphs"] - graphs == 4  # nothing compiled while serving
    with pytest.raises(ValueError, match="compiled decoding of an int8-dynamic model"):
        pytest.importorskip("torchao")
        from neuraflux.model.quantize import quantize_model

        Engine(quantize_model(tiny_lm()[0], "int8-dynamic"), tok, compile=True)


def test_a_request_joining_mid_stream_into_a_reused_slot_matches_alone(lm):
    model, tok = lm
    first, late = chat_ids(tok, "a long question about towers?"), chat_ids(tok, "ok")
    engine = Engine(model, tok, max_concurrent=2, max_queue=2).start()
    try:
        warm = Collector()  # fills slot 1 with 30+ positions, then frees it: stale keys the next request must not see
        engine.submit(request(first, 4), Collector())
        engine.submit(request(first + first[:5], 4), warm)
        warm.wait()
        long_one, joiner = Collector(), Collector()
        engine.submit(request(first, 30), long_one)
        long_one.next()  # the long request is decoding
        engine.submit(request(late, 6), joiner)
        joiner.wait()
        long_one.wait()
    finally:
        engine.stop()
    assert joiner.text == alone(model, tok, late, 6)
    assert long_one.text == alone(model, tok, first, 30)


def test_stop_token_ends_with_stop_and_is_not_streamed(lm):
    model, tok = lm
    ids = chat_ids(tok, "hello")
    expected = alone(model, tok, ids, 5)
    stop = tok.encode(expected[2])[0]  # the third greedy character acts as the stop token
    sink = Collector()
    engine = Engine(model, tok).start()
    try:
        engine.submit(request(ids, 5, stop_ids=(stop,)), sink)
        done = sink.wait()
    finally:
        engine.stop()
    first_stop = expected.index(expected[2])  # the stop character may also appear earlier
    assert sink.text == expected[:first_stop]
    assert done == DoneEvent("stop", done.usage) and done.usage.completion_tokens == first_stop


def test_a_full_slot_ends_with_length(lm):
    # slot_length 40, a 38-token prompt: tokens 1 and 2 are fed back (positions 38, 39), token 3 fills the slot
    model, tok = lm
    ids = tok.encode("abcdefghij" * 4)[:38]
    sink = Collector()
    engine = Engine(model, tok, slot_length=40).start()
    try:
        engine.submit(request(ids, 10), sink)
        done = sink.wait()
    finally:
        engine.stop()
    assert done.finish_reason == "length" and done.usage.completion_tokens == 3
    assert sink.text == alone(model, tok, ids, 3)


def test_queue_bound_refuses_at_once_with_overloaded(lm):
    model, tok = lm
    engine = Engine(model, tok, max_concurrent=1, max_queue=1)  # not started: nothing leaves the queue
    engine.submit(request([5, 6], 3), Collector())
    engine.submit(request([5, 6], 3), Collector())
    with pytest.raises(ServeError) as err:
        engine.submit(request([5, 6], 3), Collector())
    assert err.value.code == "overloaded"
    assert "2 requests are in flight, the limit is max_concurrent (1) + max_queue (1)" in err.value.message


def test_prompt_that_fills_a_slot_is_refused(lm):
    model, tok = lm
    engine = Engine(model, tok, slot_length=16)
    with pytest.raises(ServeError, match="the prompt is 16 tokens; a slot holds 16 with the answer"):
        engine.submit(request(list(range(8, 24)), 3), Collector())


def test_cancel_frees_the_slot_and_reports_cancelled(lm):
    model, tok = lm
    slow_down(model, 0.005)
    engine = Engine(model, tok, max_concurrent=2).start()
    sink = Collector()
    try:
        ticket = engine.submit(request(chat_ids(tok, "hi"), 60), sink)
        assert isinstance(sink.next(), TokenEvent)
        assert engine.cancel(ticket, "stop pressed")
        end = sink.wait()
        assert end == ErrorEvent("cancelled", "stop pressed")
        assert engine.stats().active == 0
        assert not engine.cancel(ticket)  # already over
    finally:
        engine.stop()
    assert len(sink.text) < 60


def test_timeout_and_a_failing_model_are_errors_and_the_engine_keeps_serving(lm):
    model, tok = lm
    fail = {"once": True}

    def explode(*_):
        if fail.pop("once", False):
            raise RuntimeError("boom")

    model.transformer.register_forward_pre_hook(explode)
    engine = Engine(model, tok).start()
    try:
        broken, late, fine = Collector(), Collector(), Collector()
        engine.submit(request([8, 9, 10], 4), broken)
        assert broken.wait() == ErrorEvent("internal", "generation failed: RuntimeError: boom")
        engine.submit(request([8, 9, 10], 4, timeout_s=1e-9), late)
        end = late.wait()
        assert end.code == "timeout" and "serve.request_timeout_s" in end.message
        engine.submit(request([8, 9, 10], 4), fine)
        assert fine.wait().finish_reason == "length"
        assert fine.text == alone(model, tok, [8, 9, 10], 4)
    finally:
        engine.stop()


def test_top_k_one_sampling_equals_greedy(lm):
    # temperature 1 with top_k=1 goes through sample_next/filter_logits and must pick the argmax every time
    model, tok = lm
    ids = chat_ids(tok, "tell me")
    sink = Collector()
    engine = Engine(model, tok).start()
    try:
        engine.submit(request(ids, 6, sampling=Sampling(1.0, 1, None)), sink)
        sink.wait()
    finally:
        engine.stop()
    assert sink.text == alone(model, tok, ids, 6)
