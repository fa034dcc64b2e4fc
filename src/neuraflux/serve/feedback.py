"""The server's side of human feedback: remembering each answer it sends, taking votes on them (`POST /v1/feedback`
and the WebSocket's `feedback` message), their counts (`GET /v1/feedback/stats`), and compare mode: two blind
answers to one prompt, from one model or from the served model and `--compare-model`.

The database is `neuraflux.feedback.store` (no web stack there); every call to it runs in a worker thread, so the
event loop never waits on the disk. A vote's fields are checked here and refused naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from neuraflux.chat import Message
from neuraflux.feedback.store import (
    CHOICES,
    RATINGS,
    Compare,
    Completion,
    Edit,
    FeedbackStore,
    FeedbackUnavailable,
    Thumbs,
    UnknownCompletion,
    Vote,
    annotator_of,
)
from neuraflux.serve.engine import DoneEvent, Engine, ErrorEvent, EventStream, GenerationRequest, TokenEvent
from neuraflux.serve.protocol import PreparedPrompt, Sampling, ServeError, _show

log = logging.getLogger(__name__)

VOTE_FIELDS = {
    "thumbs": ("kind", "id", "rating", "comment"),
    "compare": ("kind", "ids", "choice", "comment"),
    "edit": ("kind", "id", "text", "comment"),
}
FEEDBACK_OFF = "this server keeps no feedback: start it with feedback_db=PATH (a SQLite file)"


def _text_field(data: dict, name: str, max_chars: int, request_id: Any, required: bool) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        what = "a non-empty string" if required else "a string or null"
        raise ServeError("invalid_field", f"'{name}' must be {what}, got {_show(value)}", request_id)
    if len(value) > max_chars:
        raise ServeError(
            "invalid_field",
            f"'{name}' is {len(value)} characters, over the limit of {max_chars} (serve.max_feedback_chars)",
            request_id,
        )
    return value


def _completion_id(value: Any, name: str, request_id: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ServeError(
            "invalid_field", f"'{name}' must be a completion id (a string), got {_show(value)}", request_id
        )
    return value


def parse_vote(data: dict, max_chars: int, request_id: Any = None) -> Vote:
    """A vote from a JSON object: thumbs `{id, rating, comment?}` (kind optional), `{kind: compare, ids: [a, b],
    choice}` or `{kind: edit, id, text}`, each with an optional `comment`; ServeError `invalid_field` names the
    field. `type` (the WebSocket's message type) is allowed beside them."""
    kind = data.get("kind", "thumbs")
    if kind not in VOTE_FIELDS:
        raise ServeError("invalid_field", f"'kind' must be one of {list(VOTE_FIELDS)}, got {_show(kind)}", request_id)
    extra = sorted(set(data) - set(VOTE_FIELDS[kind]) - {"type"})
    if extra:
        raise ServeError(
            "invalid_field", f"unknown fields {extra}; {kind} feedback takes {list(VOTE_FIELDS[kind][1:])}", request_id
        )
    comment = _text_field(data, "comment", max_chars, request_id, required=False)
    if kind == "compare":
        ids = data.get("ids")
        if not isinstance(ids, list) or len(ids) != 2:
            raise ServeError(
                "invalid_field", f"'ids' must be a list of two completion ids, got {_show(ids)}", request_id
            )
        pair = (_completion_id(ids[0], "ids[0]", request_id), _completion_id(ids[1], "ids[1]", request_id))
        if pair[0] == pair[1]:
            raise ServeError("invalid_field", "'ids' names the same completion twice", request_id)
        choice = data.get("choice")
        if choice not in CHOICES:
            raise ServeError(
                "invalid_field", f"'choice' must be one of {list(CHOICES)}, got {_show(choice)}", request_id
            )
        return Compare(pair, choice, comment)
    completion_id = _completion_id(data.get("id"), "id", request_id)
    if kind == "edit":
        return Edit(completion_id, _text_field(data, "text", max_chars, request_id, required=True), comment)
    rating = data.get("rating")
    if rating not in RATINGS:
        raise ServeError("invalid_field", f"'rating' must be one of {list(RATINGS)}, got {_show(rating)}", request_id)
    return Thumbs(completion_id, rating, comment)


@dataclass(frozen=True)
class Side:
    """One model a server answers with: its engine, weights hash (None while feedback is off) and name."""

    engine: Engine
    model: str | None
    name: str


class FeedbackHub:
    """The feedback database as the server uses it: `remember` answers (no waiting), `vote` and `stats` on the
    database's own thread, its failures as protocol errors.

    One thread of its own, not the event loop's shared pool: a database locked for seconds then delays only
    feedback, never the prompt preparation that shares that pool."""

    def __init__(self, store: FeedbackStore, api_key: str | None, max_chars: int):
        self.store, self.max_chars = store, max_chars
        self.annotator = annotator_of(api_key)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuraflux-feedback")
        self._flush_queued = threading.Event()  # one flush waiting is enough: it writes whatever is pending

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def close(self) -> None:
        """Write what is still pending (a failure is logged: the database was unusable) and close."""
        await self._call(self._flush_quietly)
        await self._call(self.store.close)  # the thread stays: a store reopens on its next call

    def remember(
        self,
        side: Side,
        prompt: str,
        messages: list[Message] | None,
        sources: list[dict],
        text: str,
        sampling: Sampling,
        max_new_tokens: int,
        finish_reason: str | None,
        completion_id: str | None = None,
        pair: str | None = None,
    ) -> str:
        """Hold an answer for the database and write it soon, from a worker thread; its id."""
        completion_id = completion_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        settings = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
        self.store.remember(
            Completion(
                id=completion_id,
                model=side.model,
                prompt=prompt,
                messages=None if messages is None else [{"role": m.role, "content": m.content} for m in messages],
                sources=sources,
                text=text,
                sampling={**settings, "max_new_tokens": max_new_tokens},
                model_name=side.name,
                finish_reason=finish_reason,
                pair=pair,
            )
        )
        if not self._flush_queued.is_set():
            self._flush_queued.set()
            asyncio.get_running_loop().run_in_executor(self.thread, self._flush_quietly)
        return completion_id

    def _flush_quietly(self) -> None:
        self._flush_queued.clear()  # answers remembered from now on need another flush; these are taken now
        if not self.store.pending:
            return
        try:
            self.store.flush()
        except FeedbackUnavailable as err:  # kept in memory; the next write takes them
            log.warning("%s; %d answers wait for the next write", err, self.store.pending)

    async def vote(self, data: dict, request_id: Any = None) -> dict:
        vote = parse_vote(data, self.max_chars, request_id)
        try:
            stored = await self._call(self.store.vote, vote, self.annotator)
        except UnknownCompletion as err:
            raise ServeError("unknown_completion", str(err), request_id) from None
        except FeedbackUnavailable as err:
            raise ServeError("feedback_unavailable", str(err), request_id) from None
        kind = {Thumbs: "thumbs", Compare: "compare", Edit: "edit"}[type(vote)]
        return {"object": "feedback", "kind": kind, "vote_id": stored.vote_id, "replaced": stored.replaced}

    async def stats(self) -> dict:
        try:
            return {"object": "feedback.stats", **await self._call(self.store.stats)}
        except FeedbackUnavailable as err:
            raise ServeError("feedback_unavailable", str(err)) from None


# ---- compare mode -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    id: str  # the completion id: opaque, names no model
    text: str
    finish_reason: str
    usage: dict


async def collect(engine: Engine, request: GenerationRequest) -> tuple[str, DoneEvent]:
    """A request's whole text and its done event; ServeError on its error; cancelled if the caller is."""
    pieces = []
    async for event in EventStream(engine, request).events():
        if isinstance(event, TokenEvent):
            pieces.append(event.text)
        elif isinstance(event, ErrorEvent):
            raise ServeError(event.code, event.message)
        else:
            return "".join(pieces), event
    raise RuntimeError("the engine's event stream ended without a done or error event")


async def answer_pair(
    sides: tuple[Side, Side],
    hub: FeedbackHub | None,
    prepared: PreparedPrompt,
    max_new_tokens: int,
    sampling: Sampling,
    timeout_s: float,
    prompt: str,
    messages: list[Message] | None,
    check: Callable[[str], str] | None = None,
) -> list[Answer]:
    """Two answers to one prompt, one from each side (the same side twice for two samples of one model), in random
    order; each remembered for feedback (when `hub` is set) with the other as its pair. `check` is the constitution
    filter, applied to each."""
    request = GenerationRequest(tuple(prepared.ids), max_new_tokens, sampling, prepared.stop_ids, timeout_s)
    tasks = [asyncio.ensure_future(collect(side.engine, request)) for side in sides]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:  # one side failed (overloaded, timeout): stop the other, whose answer has no use now
        for task in tasks:
            task.cancel()
        raise
    ids = [f"chatcmpl-{uuid.uuid4().hex[:24]}" for _ in sides]
    sources = [{"id": h.id, "text": h.text, "score": round(h.score, 4)} for h in prepared.sources]
    answers = []
    for i, (side, (text, done)) in enumerate(zip(sides, results, strict=True)):
        text = check(text) if check is not None else text
        if hub is not None:
            hub.remember(
                side, prompt, messages, sources, text, sampling, max_new_tokens, done.finish_reason, ids[i], ids[1 - i]
            )
        answers.append(Answer(ids[i], text, done.finish_reason, done.usage.to_dict()))
    random.shuffle(answers)  # blind: which answer came from which model is only in the database
    return answers
