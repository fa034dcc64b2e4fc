"""Continuous batching: one thread owns the model and decodes every active request in one forward a step.

Each request holds a slot: a row of one preallocated KV cache with its own position (`KVCache.positions`),
so requests of different lengths decode together and a new request joins between steps after its prompt is
prefilled into a free row. A finished, cancelled or timed-out request frees its row at once. Requests beyond
the free slots wait in a bounded queue; beyond `max_concurrent + max_queue` in flight, `submit` refuses with
`overloaded` at once instead of letting clients hang. Sampling goes through `generation.sample_next`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from neuraflux.model.generation import check_compilable, compiled_decode_step, key_bucket, sample_next
from neuraflux.model.nano import KVCache, NanoLM
from neuraflux.serve.protocol import Sampling, ServeError
from neuraflux.tokenizer import NanoTokenizer, StreamDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling
    stop_ids: tuple[int, ...] = ()  # sampling one of these ends the request with finish_reason "stop"
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


@dataclass(frozen=True)
class TokenEvent:
    text: str  # may hold several tokens' text, or be held back while a multi-byte character is incomplete


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens or the slot is full)
    usage: Usage


@dataclass(frozen=True)
class ErrorEvent:
    code: str  # a protocol.ERROR_CODES key: cancelled, timeout or internal
    message: str


Event = TokenEvent | DoneEvent | ErrorEvent
Sink = Callable[[Event], None]  # called on the engine thread; must not block


@dataclass(frozen=True)
class EngineStats:
    active: int  # requests holding a slot
    queued: int  # requests waiting for one
    slots: int
    steps: int  # batched decoding forwards so far
    tokens: int  # tokens generated so far


class Ticket:
    """One submitted request as the engine tracks it; the caller keeps it to cancel."""

    def __init__(self, request: GenerationRequest, sink: Sink, decoder: StreamDecoder):
        self.request, self.sink, self.decoder = request, sink, decoder
        self.deadline = time.monotonic() + request.timeout_s
        self.cancel_reason: str | None = None
        self.finished = False
        self.slot: int | None = None
        self.generated = 0
        self.next_token = 0  # the last sampled token: the slot's input at the next step


class Engine:
    """The model's owner: `submit` requests from any thread, events arrive through each request's sink."""

    def __init__(
        self,
        model: NanoLM,
        tokenizer: NanoTokenizer,
        max_concurrent: int = 8,
        max_queue: int = 32,
        slot_length: int | None = None,
        seed: int = 0,
        compile: bool = False,
    ):
        """`compile`: each decoding step is generation's torch.compile'd static step over a power-of-two number of
        slots (free ones fed a pad token) and a power-of-two key bucket, every such shape compiled by `start`;
        ValueError for a model whose compiled step is refused (int8-dynamic)."""
        if max_concurrent <= 0 or max_queue < 0:
            raise ValueError(f"max_concurrent must be > 0 and max_queue >= 0, got {max_concurrent} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        c = model.config
        self.slot_length = min(c.max_position_embeddings, slot_length or c.max_position_embeddings)
        w = model.lm_head.weight
        self.device = w.device
        self.cache = KVCache.slots(c, max_concurrent, self.slot_length, w.device, w.dtype)
        self.generator = torch.Generator(device=w.device).manual_seed(seed)
        self._compiled = None
        if compile:
            check_compilable(model)
            self._compiled = compiled_decode_step()
        self.slots: list[Ticket | None] = [None] * max_concurrent
        self.pending: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._steps = 0
        self._tokens = 0

    # ---- the callers' side ------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._compiled is not None and self._thread is None:
            self._compile_shapes()
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="neuraflux-engine", daemon=True)
            self._thread.start()
        return self

    def _compile_shapes(self) -> None:
        """Compile the decoding step for every (rows, key bucket) pair it can meet, before any request: compiling
        the first time traffic reached a shape stalled every request in flight for seconds. The steps write into
        free slots at position 0, which a prefill overwrites."""
        # the rules `_decode_step` applies, over every count of busy rows and every length a slot can hold
        rows = sorted({self._compiled_rows(n) for n in range(1, self.max_concurrent + 1)})
        keys = sorted({key_bucket(n, self.slot_length) for n in range(1, self.slot_length + 1)})
        shapes = [(r, k) for k in keys for r in rows]
        log.info("compiling the decoding step for %d shapes (rows x keys)", len(shapes))
        started = time.monotonic()
        with torch.no_grad():
            for r, bucket in shapes:
                cache = self.cache.rows(r)
                tokens = torch.full((r, 1), self.model.config.pad_token_id, dtype=torch.long, device=self.device)
                self._compiled(self.model, tokens, cache.positions, cache.keys, cache.values, bucket)
        self.cache.positions.zero_()
        log.info("compiled in %.1f s", time.monotonic() - started)

    def _compiled_rows(self, top: int) -> int:
        """The rows a compiled step runs for the busy rows [0, top): a power of two (as few shapes to compile as key
        buckets), at most max_concurrent."""
        return min(self.max_concurrent, 1 << (top - 1).bit_length())

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail whatever is left with `cancelled`, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: GenerationRequest, sink: Sink) -> Ticket:
        """Queue a request; raises ServeError `overloaded` when the queue is full, `prompt_too_long` when the
        prompt leaves no room in a slot."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("a generation request needs at least one prompt token")
        if n >= self.slot_length:
            raise ServeError(
                "prompt_too_long", f"the prompt is {n} tokens; a slot holds {self.slot_length} with the answer"
            )
        if request.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {request.max_new_tokens}")
        ticket = Ticket(request, sink, StreamDecoder(self.tokenizer))
        with self._cond:
            if self._stopping:  # before start() is fine: requests wait in the queue
                raise ServeError("overloaded", "the generation engine has stopped")
            busy = self._active_locked() + len(self.pending)
            if busy >= self.max_concurrent + self.max_queue:
                raise ServeError(
                    "overloaded",
                    f"{busy} requests are in flight, the limit is max_concurrent ({self.max_concurrent}) + "
                    f"max_queue ({self.max_queue}); retry later",
                )
            self.pending.append(ticket)
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket, reason: str = "cancelled by the client") -> bool:
        """Ask for a request to stop; its slot is freed before the next step. False if it already ended."""
        with self._cond:
            if ticket.finished:
                return False
            ticket.cancel_reason = ticket.cancel_reason or reason
            self._cond.notify_all()
            return True

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(self._active_locked(), len(self.pending), self.max_concurrent, self._steps, self._tokens)

    def _active_locked(self) -> int:
        return sum(t is not None for t in self.slots)

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._stopping and not self.pending and not self._active_locked():
                        self._cond.wait(timeout=1.0)
                    if self._stopping:
                        break
                    admitted, dropped = self._admit_locked()
                for ticket, event in dropped:
                    self._emit(ticket, event)
                self._retire_cancelled()
                for ticket in admitted:
                    self._guarded(lambda t=ticket: self._prefill(t), [ticket])
                active = [t for t in self.slots if t is not None]
                if active:
                    self._guarded(lambda a=active: self._decode_step(a), active)
        self._fail_all("cancelled", "the server is shutting down")

    def _admit_locked(self) -> tuple[list[Ticket], list[tuple[Ticket, Event]]]:
        """Move waiting requests into free slots (lowest first, so the batched rows stay packed at the top)."""
        now = time.monotonic()
        dropped = []
        for ticket in list(self.pending):
            event = self._ending(ticket, now)
            if event is not None:
                self.pending.remove(ticket)
                ticket.finished = True
                dropped.append((ticket, event))
        admitted = []
        for slot, holder in enumerate(self.slots):
            if holder is None and self.pending:
                ticket = self.pending.popleft()
                ticket.slot = slot
                self.slots[slot] = ticket
                admitted.append(ticket)
        return admitted, dropped

    def _ending(self, ticket: Ticket, now: float) -> ErrorEvent | None:
        if ticket.cancel_reason is not None:
            return ErrorEvent("cancelled", ticket.cancel_reason)
        if now > ticket.deadline:
            return ErrorEvent(
                "timeout", f"the request ran past its {ticket.request.timeout_s:g} s limit (serve.request_timeout_s)"
            )
        return None

    def _retire_cancelled(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self.slots if t is not None]:
            event = self._ending(ticket, now)
            if event is not None:
                self._finish(ticket, event)

    def _guarded(self, step: Callable[[], None], tickets: list[Ticket]) -> None:
        """Run a model step; if it raises, the requests in it fail with `internal` and the engine carries on."""
        try:
            step()
        except Exception as err:  # a failing request must not take the server down
            log.exception("generation step failed")
            for ticket in tickets:
                if not ticket.finished:
                    self._finish(ticket, ErrorEvent("internal", f"generation failed: {type(err).__name__}: {err}"))

    def _prefill(self, ticket: Ticket) -> None:
        """Run the prompt into the ticket's slot and take its first token from the last position's logits."""
        slot = ticket.slot
        self.cache.positions[slot] = 0
        row = KVCache(
            keys=[k[slot : slot + 1] for k in self.cache.keys],
            values=[v[slot : slot + 1] for v in self.cache.values],
            positions=self.cache.positions[slot : slot + 1],
        )
        ids = torch.tensor([ticket.request.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        hidden = self.model.transformer(ids, kv_cache=row)  # (1, T, C)
        logits = self.model.lm_head(hidden[:, -1])  # (1, V)
        self._accept(ticket, self._sample(logits, [ticket])[0])

    def _decode_step(self, active: list[Ticket]) -> None:
        """One forward for every active request: rows [0, top) of the cache (compiled: top rounded up to a power of
        two), free rows fed a dummy token."""
        top = max(t.slot for t in active) + 1
        if self._compiled is not None:
            top = self._compiled_rows(top)
        tokens = torch.full((top,), self.model.config.pad_token_id, dtype=torch.long)
        live = torch.zeros(top, dtype=torch.bool)
        for t in active:
            tokens[t.slot] = t.next_token
            live[t.slot] = True
        positions = self.cache.positions[:top]
        positions.masked_fill_(~live.to(self.device), 0)  # a free row writes at 0, where the next prefill overwrites
        rows = torch.tensor([t.slot for t in active], device=self.device)
        if self._compiled is None:
            hidden = self.model.transformer(tokens.to(self.device)[:, None], kv_cache=self.cache.rows(top))
            logits = self.model.lm_head(hidden[rows, -1])  # (N, V)
        else:
            length = int(positions.max()) + 1
            if length > self.slot_length:
                raise ValueError(f"a cache row would hold {length} tokens, over its limit of {self.slot_length}")
            cache = self.cache.rows(top)
            step = self._compiled(
                self.model,
                tokens.to(self.device)[:, None],
                cache.positions,
                cache.keys,
                cache.values,
                key_bucket(length, self.slot_length),
            )  # (top, V)
            cache.positions += 1  # a view of the engine's positions: advances them
            logits = step[rows]
        with self._cond:
            self._steps += 1
        for ticket, token in zip(active, self._sample(logits, active)):
            self._accept(ticket, token)

    def _sample(self, logits: torch.Tensor, tickets: list[Ticket]) -> list[int]:
        """(N, V) logits -> N token ids; rows that share sampling settings are sampled together."""
        groups: dict[Sampling, list[int]] = defaultdict(list)
        for i, t in enumerate(tickets):
            groups[t.request.sampling].append(i)
        out = [0] * len(tickets)
        for s, rows in groups.items():
            picked = sample_next(logits[rows], s.temperature, s.top_k, s.top_p, self.generator)
            for i, token in zip(rows, picked.tolist()):
                out[i] = token
        return out

    def _accept(self, ticket: Ticket, token: int) -> None:
        """Stream a sampled token, or end the request on a stop token or a limit."""
        request = ticket.request
        if token in request.stop_ids:
            self._finish(ticket, DoneEvent("stop", Usage(len(request.prompt_ids), ticket.generated)))
            return
        ticket.generated += 1
        with self._cond:
            self._tokens += 1
        text = ticket.decoder.push(token)
        if text:
            self._emit(ticket, TokenEvent(text))
        full = int(self.cache.positions[ticket.slot]) >= self.slot_length  # no room to feed this token back
        if ticket.generated >= request.max_new_tokens or full:
            self._finish(ticket, DoneEvent("length", Usage(len(request.prompt_ids), ticket.generated)))
        else:
            ticket.next_token = token

    def _finish(self, ticket: Ticket, event: Event) -> None:
        if isinstance(event, DoneEvent):
            rest = ticket.decoder.flush()
            if rest:
                self._emit(ticket, TokenEvent(rest))
        with self._cond:
            if ticket.slot is not None and self.slots[ticket.slot] is ticket:
                self.slots[ticket.slot] = None
                self.cache.positions[ticket.slot] = 0
            ticket.finished = True
        self._emit(ticket, event)

    def _emit(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): stop generating for it
            log.warning("could not deliver an event; cancelling the request", exc_info=True)
            ticket.cancel_reason = ticket.cancel_reason or "the client is gone"

    def _fail_all(self, code: str, message: str) -> None:
        with self._cond:
            left = [t for t in self.slots if t is not None] + list(self.pending)
            self.pending.clear()
        for ticket in left:
            self._finish(ticket, ErrorEvent(code, message))


class EventStream:
    """A submitted request's events as an async iterator; leaving it early (client gone) cancels the request."""

    def __init__(self, engine: Engine, request: GenerationRequest):
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.ticket = engine.submit(request, lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev))

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self.queue.get()
                yield event
                if not isinstance(event, TokenEvent):
                    return
        finally:
            self.engine.cancel(self.ticket, "the client went away")
