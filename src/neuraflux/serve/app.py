"""The FastAPI app: the WebSocket protocol at /ws, OpenAI-shaped HTTP endpoints, the chat page at /.

Every route shares one Engine (continuous batching); the protocol and its error codes are in `protocol.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from neuraflux.feedback.constitution import Constitution
from neuraflux.feedback.store import FeedbackStore, weights_sha256
from neuraflux.model.nano import NanoLM
from neuraflux.rag import NanoRAG
from neuraflux.retrieval import Retriever
from neuraflux.serve.config import ServeConfig
from neuraflux.serve.engine import (
    DoneEvent,
    Engine,
    ErrorEvent,
    Event,
    EventStream,
    GenerationRequest,
    Ticket,
    TokenEvent,
)
from neuraflux.serve.feedback import FEEDBACK_OFF, FeedbackHub, Side, answer_pair
from neuraflux.serve.guard import Guard
from neuraflux.serve.protocol import (
    CancelMessage,
    FeedbackMessage,
    Limits,
    PreparedPrompt,
    Sampling,
    ServeError,
    check_bool,
    check_max_new_tokens,
    check_sampling,
    decode_json_object,
    last_user_text,
    parse_client_message,
    parse_messages,
    prepare_prompt,
)
from neuraflux.tokenizer import NanoTokenizer
from neuraflux.world import World, WorldConfig, generate_world

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
WS_POLICY_VIOLATION = 1008  # RFC 6455 close code for a refused client


@dataclass
class ServerState:
    config: ServeConfig
    limits: Limits
    engine: Engine
    tokenizer: NanoTokenizer
    rag: NanoRAG | None
    model_name: str
    constitution: Constitution | None = None  # set: every response is checked, and revised, before it is sent
    world: World | None = None  # the built-in world, for the constitution's judge checks
    feedback: FeedbackHub | None = None  # serve.feedback_db set: answers are remembered and votes taken
    sides: tuple[Side, Side] | None = None  # who answers `compare`: the model twice, or it and --compare-model

    def hub(self, request_id: Any = None) -> FeedbackHub:
        if self.feedback is None:
            raise ServeError("feedback_disabled", FEEDBACK_OFF, request_id)
        return self.feedback


def limits_for(config: ServeConfig, model: NanoLM, tokenizer: NanoTokenizer | None = None) -> Limits:
    """The config's limits capped to the model: a prompt must leave at least one position to generate into."""
    max_prompt = min(config.max_prompt_tokens, model.config.max_position_embeddings - 1)
    if max_prompt < config.max_prompt_tokens:
        log.info(
            "serve.max_prompt_tokens %d capped to %d by the model's positions", config.max_prompt_tokens, max_prompt
        )
    return Limits(
        max_prompt_tokens=max_prompt,
        max_new_tokens=config.max_new_tokens,
        default_max_new_tokens=config.default_max_new_tokens,
        default_sampling=Sampling(config.temperature, config.top_k, config.top_p),
        max_prompt_chars=None if tokenizer is None else max_prompt * tokenizer.max_chars_per_token,
        max_message_bytes=config.max_body_bytes,
    )


def build_sides(
    config: ServeConfig,
    model: NanoLM,
    tokenizer: NanoTokenizer,
    engine: Engine,
    compare_model: tuple[NanoLM, NanoTokenizer, str] | None,
    limits: Limits,
    name: str | None,
) -> tuple[tuple[Side, Side], Limits]:
    """The two sides of a `compare` request, and the limits capped to the second model's positions too. The
    weights are hashed (once, here) only when feedback is on: the hash names a model in the feedback database."""
    hashed = config.feedback_db is not None
    served = Side(engine, weights_sha256(model) if hashed else None, name or "neuraflux")
    if compare_model is None:
        return (served, served), limits
    other, other_tokenizer, other_name = compare_model
    if other_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ValueError(
            "--compare-model: its tokenizer is not the served model's (compare mode gives both the same prompt ids)"
        )
    cap = min(limits.max_prompt_tokens, other.config.max_position_embeddings - 1)
    limits = dataclasses.replace(limits, max_prompt_tokens=cap)
    other_engine = Engine(
        other,
        other_tokenizer,
        max_concurrent=config.max_concurrent,
        max_queue=config.max_queue,
        slot_length=cap + limits.max_new_tokens,
        seed=config.seed + 1,
        compile=config.compile,
    )
    return (served, Side(other_engine, weights_sha256(other) if hashed else None, other_name)), limits


def feedback_hub(config: ServeConfig) -> FeedbackHub | None:
    """The feedback database's door, or None when serve.feedback_db is null. Nothing is opened here: a locked or
    damaged file is answered per call (`feedback_unavailable`), never a failed start (`main` checks it first)."""
    if config.feedback_db is None:
        return None
    store = FeedbackStore(config.feedback_db, timeout_s=config.feedback_timeout_s)
    return FeedbackHub(store, config.api_key, config.max_feedback_chars)


class ServerRAG(NanoRAG):
    """NanoRAG whose context budget also respects serve.max_prompt_tokens, so retrieved context is cut to fit
    instead of the whole request failing with prompt_too_long."""

    def __init__(self, *args, max_prompt_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_prompt_tokens = max_prompt_tokens

    def context_budget(self, max_new_tokens: int) -> int:
        return min(super().context_budget(max_new_tokens), self.max_prompt_tokens)


def builtin_world() -> World:
    """The default built-in world: retrieval=world searches its documents, judge checks score against it."""
    return generate_world(WorldConfig())


def load_retriever(spec: str | None, world: World | None = None) -> Retriever | None:
    """None, `world` (every document of the built-in world: `world` if given, else generated here, embedded and
    indexed as conf/retrieval/default.yaml says) or a directory written by Retriever.save."""
    if spec is None:
        return None
    if spec == "world":
        from neuraflux.rag import world_retriever
        from neuraflux.retrieval.documents import load_retrieval_settings

        return world_retriever(world if world is not None else builtin_world(), load_retrieval_settings())
    return Retriever.load(spec)


def load_constitution(spec: str | None) -> Constitution | None:
    """None (the filter is off), a constitution's name (`default`) or YAML path; a missing file, bad YAML or a
    malformed principle raises ValueError naming the file and, from the constitution module, principle and field."""
    if spec is None:
        return None
    try:
        return Constitution.load(spec)
    except ValueError as err:
        raise ValueError(f"serve.{err}") from None


class RedactApiKey(logging.Filter):
    """Blanks `api_key=...` in access-log lines: a WebSocket client may pass its key in the query string (browsers
    cannot set headers there), and a secret must never reach a log file."""

    PATTERN = re.compile(r"(api_key=)[^&\s\"]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.PATTERN.sub(r"\1***", record.msg)
        return True


def redact_access_log() -> None:
    """Install `RedactApiKey` on uvicorn's access logger, once."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactApiKey) for f in access.filters):
        access.addFilter(RedactApiKey())


def authorized(api_key: str | None, header: str | None, query: str | None) -> bool:
    """No key configured: everyone. Otherwise `Authorization: Bearer KEY`, or `?api_key=KEY` (browsers cannot set
    headers on a WebSocket)."""
    if api_key is None:
        return True
    token = header[7:].strip() if header and header[:7].lower() == "bearer " else query
    return token is not None and hmac.compare_digest(token.encode(), api_key.encode())


UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer KEY' (or ?api_key=KEY on the WebSocket)"


def create_app(
    config: ServeConfig,
    model: NanoLM,
    tokenizer: NanoTokenizer,
    retriever: Retriever | None = None,
    model_name: str | None = None,
    world: World | None = None,
    compare_model: tuple[NanoLM, NanoTokenizer, str] | None = None,
) -> FastAPI:
    """The server around one model; its engine thread runs between the app's startup and shutdown.

    `compare_model` (model, tokenizer, name): a second model, with its own engine, that answers one side of each
    `compare` request; its tokenizer must be the served model's. Without it both sides are the served model.

    `world` is the built-in world when the caller already generated it (for retrieval=world); a constitution with
    judge checks uses it, or generates it here when none is given. A bad serve.constitution raises ValueError.
    """
    constitution = load_constitution(config.constitution)  # first: a bad file fails before any other work
    if constitution is not None and constitution.needs_world and world is None:
        world = builtin_world()
    limits = limits_for(config, model, tokenizer)
    engine = Engine(
        model,
        tokenizer,
        max_concurrent=config.max_concurrent,
        max_queue=config.max_queue,
        slot_length=limits.max_prompt_tokens + limits.max_new_tokens,
        seed=config.seed,
        compile=config.compile,
    )
    name = config.model_name or model_name
    sides, limits = build_sides(config, model, tokenizer, engine, compare_model, limits, name)
    rag = None
    if retriever is not None:
        from neuraflux.retrieval.documents import load_retrieval_settings

        k = config.retrieval_k if config.retrieval_k is not None else load_retrieval_settings().k
        rag = ServerRAG(model, tokenizer, retriever, k=k, max_prompt_tokens=limits.max_prompt_tokens)
        # a server with a store retrieves for every request that does not opt out ("use_retrieval": false)
        limits = dataclasses.replace(limits, retrieval_default=True)
    state = ServerState(
        config,
        limits,
        engine,
        tokenizer,
        rag,
        config.model_name or model_name or "neuraflux",
        constitution,
        world if constitution is not None and constitution.needs_world else None,
        feedback_hub(config),
        sides,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engines = list({id(s.engine): s.engine for s in sides}.values())  # one, or two with --compare-model
        for each in engines:
            await asyncio.to_thread(each.start)  # serve.compile compiles every decoding shape here: off the loop
        try:
            yield
        finally:
            for each in engines:
                each.stop()
            if state.feedback is not None:
                await state.feedback.close()

    redact_access_log()
    # the API docs are served by the routes below, behind the key when one is set
    app = FastAPI(title="NeuraFlux", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.add_middleware(Guard, config=config)  # Host, Origin, body size and read time: before any route

    @app.exception_handler(ServeError)
    async def serve_error(_request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse(err.to_openai(), status_code=err.status)

    def require_key(request: Request) -> None:
        if not authorized(config.api_key, request.headers.get("authorization"), None):
            raise ServeError("unauthorized", UNAUTHORIZED)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        require_key(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        require_key(request)
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="NeuraFlux API")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> dict:
        s = engine.stats()
        return {
            "status": "ok",
            "model": state.model_name,
            "active": s.active,
            "queued": s.queued,
            "slots": s.slots,
            "max_queue": config.max_queue,
            "retrieval": rag is not None,
            "feedback": config.feedback_db is not None,  # the page shows its rating controls only then
            "quantization": getattr(model, "quantization", None),  # int8 | int8-dynamic | None (model/quantize.py)
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        require_key(request)
        return {
            "object": "list",
            "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "neuraflux"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        require_key(request)
        data = await read_json(request)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # OpenAI allows a batch of prompts; one is what a stream can carry
        if not isinstance(prompt, str) or not prompt:
            raise ServeError(
                "invalid_field",
                f"'prompt' must be a non-empty string (or a list of one), got {json.dumps(prompt)[:60]}",
            )
        call = openai_call(state, data)
        prepared = await prepare(state, None, prompt, call)
        return await respond(state, call, prepared, chat=False, user_text=prompt, request=request, messages=None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        require_key(request)
        data = await read_json(request)
        messages = parse_messages(data.get("messages"), system_as_context=True)
        call = openai_call(state, data)
        prepared = await prepare(state, messages, None, call)
        user_text = last_user_text(messages)
        return await respond(state, call, prepared, chat=True, user_text=user_text, request=request, messages=messages)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        require_key(request)
        hub = state.hub()
        return await hub.vote(await read_json(request))

    @app.get("/v1/feedback/stats")
    async def feedback_stats(request: Request) -> dict:
        require_key(request)
        return await state.hub().stats()

    @app.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        if not authorized(
            config.api_key, websocket.headers.get("authorization"), websocket.query_params.get("api_key")
        ):
            await websocket.send_json(ServeError("unauthorized", UNAUTHORIZED).to_ws())
            await websocket.close(code=WS_POLICY_VIOLATION)
            return
        await Connection(state, websocket).serve()

    return app


# ---- the constitutional filter ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checked:
    text: str  # the response as sent: revised when a principle was broken
    broken: list[str]  # ids of the principles the generated response broke, each once, in order


def check_response(state: ServerState, request_id: Any, user_text: str, response: str) -> Checked:
    """The whole generated response through the constitution. Its checks are regexes, word lists and the world's
    judges, well under a millisecond, so this runs on the event loop."""
    result = state.constitution.filter(user_text, response, state.world)
    broken = list(dict.fromkeys(v.principle for v in result.violations))
    if result.revised:
        log.info("request %s: the constitution filter revised the response (broke %s)", request_id, broken)
    return Checked(result.response, broken)


@dataclass
class Held:
    """A request whose text is held back until the whole response has been checked."""

    user_text: str  # the last user turn: what the judges read as the prompt
    pieces: list[str] = field(default_factory=list)


# ---- WebSocket --------------------------------------------------------------------------------------------------
class Connection:
    """One WebSocket: reads client messages, writes events of all its requests through one outbox."""

    def __init__(self, state: ServerState, websocket: WebSocket):
        self.state, self.ws = state, websocket
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue[dict] = asyncio.Queue()
        self.tickets: dict[Any, Ticket] = {}  # requests in flight on this connection, by client id
        self.held: dict[Any, Held] = {}  # with the filter on: the text generated so far, by client id
        self.recorded: dict[Any, Recorded] = {}  # with feedback on: what each answer is remembered with
        self.tasks: set[asyncio.Task] = set()  # feedback votes and compare requests being answered

    async def serve(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") if message.get("text") is not None else message.get("bytes", b"")
                await self._handle(raw)
        finally:
            for ticket in self.tickets.values():
                self.state.engine.cancel(ticket, "the client disconnected")
            self.tickets.clear()
            self.held.clear()
            for task in self.tasks:
                task.cancel()
            sender.cancel()

    async def _send_loop(self) -> None:
        while True:
            payload = await self.outbox.get()
            try:
                await self.ws.send_json(payload)
            except Exception:  # the socket closed under us; the receive loop sees the disconnect and cleans up
                log.debug("send failed on a closing WebSocket", exc_info=True)
                return

    async def _handle(self, raw: str | bytes) -> None:
        state = self.state
        try:
            msg = parse_client_message(raw, state.limits)
            if isinstance(msg, FeedbackMessage):
                self._spawn(self._feedback(msg.data))
                return
            if isinstance(msg, CancelMessage):
                ticket = self.tickets.get(msg.id)
                if ticket is None:
                    raise ServeError(
                        "not_found", f"no request with id {msg.id!r} is in flight on this connection", msg.id
                    )
                state.engine.cancel(ticket)  # the `cancelled` error arrives through the request's own events
                return
            if msg.id in self.tickets:
                raise ServeError("duplicate_id", f"a request with id {msg.id!r} is already in flight", msg.id)
            raw_text = None  # a WebSocket `prompt` is one user turn of the chat, see protocol.py
            prepared = await prepare_async(
                state, msg.conversation(), raw_text, msg.use_retrieval, msg.max_new_tokens, msg.id
            )
            if msg.use_retrieval:
                docs = [{"id": h.id, "text": h.text, "score": round(h.score, 4)} for h in prepared.sources]
                self.outbox.put_nowait({"type": "sources", "id": msg.id, "docs": docs})
            if msg.compare:
                self._spawn(self._compare(msg, prepared))
                return
            request = GenerationRequest(
                tuple(prepared.ids), msg.max_new_tokens, msg.sampling, prepared.stop_ids, state.config.request_timeout_s
            )
            ticket = state.engine.submit(
                request, lambda ev, rid=msg.id: self.loop.call_soon_threadsafe(self._on_event, rid, ev)
            )
            self.tickets[msg.id] = ticket
            if state.constitution is not None:  # no await since submit: no event of this request has run yet
                self.held[msg.id] = Held(last_user_text(msg.conversation()))
            if state.feedback is not None:
                self.recorded[msg.id] = Recorded(msg, prepared)
        except ServeError as err:
            if err.request_id is None and err.code != "request_too_large":  # an oversize message is never parsed
                err.request_id = _id_of(raw)
            self.outbox.put_nowait(err.to_ws())
        except Exception as err:  # a bug in preparing one request must not end the connection
            log.exception("could not handle a client message")
            self.outbox.put_nowait(ServeError("internal", f"{type(err).__name__}: {err}", _id_of(raw)).to_ws())

    def _on_event(self, request_id: Any, event: Event) -> None:
        held = self.held.get(request_id)
        recorded = self.recorded.get(request_id)
        if isinstance(event, TokenEvent):
            if recorded is not None:
                recorded.pieces.append(event.text)
            if held is not None:
                held.pieces.append(event.text)
            else:
                self.outbox.put_nowait({"type": "token", "id": request_id, "text": event.text})
            return
        self.tickets.pop(request_id, None)
        self.held.pop(request_id, None)
        self.recorded.pop(request_id, None)
        if isinstance(event, DoneEvent):
            done = {
                "type": "done",
                "id": request_id,
                "finish_reason": event.finish_reason,
                "usage": event.usage.to_dict(),
            }
            if held is not None:
                checked = check_response(self.state, request_id, held.user_text, "".join(held.pieces))
                self.outbox.put_nowait({"type": "token", "id": request_id, "text": checked.text})
                done["filtered"] = checked.broken
            if recorded is not None:
                text = checked.text if held is not None else "".join(recorded.pieces)
                done["completion_id"] = recorded.remember(self.state, text, event.finish_reason)
            self.outbox.put_nowait(done)
        else:
            self.outbox.put_nowait({"type": "error", "id": request_id, "code": event.code, "message": event.message})

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _feedback(self, data: dict) -> None:
        vote_id = data.get("id") if isinstance(data.get("id"), str) else None
        try:
            reply = await self.state.hub(vote_id).vote(data, vote_id)
            echo = {"ids": data["ids"]} if reply["kind"] == "compare" else {"id": vote_id}  # checked by the vote
            self.outbox.put_nowait({"type": "feedback", **echo, **reply})
        except ServeError as err:
            self.outbox.put_nowait(err.to_ws())

    async def _compare(self, msg, prepared: PreparedPrompt) -> None:
        """A `compare` request: both answers in one `answers` message when both are done (or one error)."""
        try:
            answers = await compare_answers(self.state, msg.max_new_tokens, msg.sampling, prepared, msg.conversation())
            self.outbox.put_nowait({"type": "answers", "id": msg.id, "answers": [a.__dict__ for a in answers]})
        except ServeError as err:
            err.request_id = msg.id
            self.outbox.put_nowait(err.to_ws())


@dataclass
class Recorded:
    """A WebSocket request whose answer is remembered for feedback when it is done."""

    msg: Any  # the GenerateMessage
    prepared: PreparedPrompt
    pieces: list[str] = field(default_factory=list)

    def remember(self, state: ServerState, text: str, finish_reason: str) -> str:
        conversation = self.msg.conversation()
        sources = [{"id": h.id, "text": h.text, "score": round(h.score, 4)} for h in self.prepared.sources]
        return state.feedback.remember(
            state.sides[0], last_user_text(conversation), conversation, sources, text, self.msg.sampling,
            self.msg.max_new_tokens, finish_reason,
        )  # fmt: skip


async def compare_answers(
    state: ServerState, max_new_tokens: int, sampling: Sampling, prepared: PreparedPrompt, messages, raw_text=None
):
    """Two blind answers (serve/feedback.py's answer_pair), each checked by the constitution when it is on."""
    user_text = raw_text if messages is None else last_user_text(messages)
    check = None
    if state.constitution is not None:
        check = lambda text: check_response(state, "compare", user_text, text).text  # noqa: E731
    return await answer_pair(
        state.sides, state.feedback, prepared, max_new_tokens, sampling, state.config.request_timeout_s, user_text,
        messages, check,
    )  # fmt: skip


def _id_of(raw: str | bytes) -> Any:
    """The id of a message that failed a check, when it has a usable one, so the client can match the error."""
    try:
        data = decode_json_object(raw, "message")
    except ServeError:
        return None
    value = data.get("id")
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


async def prepare_async(
    state: ServerState, messages, raw_text, use_retrieval: bool, max_new_tokens: int, request_id=None
) -> PreparedPrompt:
    """The prompt's ids, built in a worker thread: tokenizing, embedding and search never run on the event loop
    (a long prompt would stall every other connection)."""
    args = (state.tokenizer, state.rag, state.limits, messages, raw_text, use_retrieval, max_new_tokens, request_id)
    return await asyncio.to_thread(prepare_prompt, *args)


# ---- OpenAI-shaped HTTP ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenAICall:
    max_new_tokens: int
    sampling: Sampling
    stream: bool
    use_retrieval: bool
    compare: bool = False  # two blind answers (serve/feedback.py)


async def read_json(request: Request) -> dict:
    """The JSON object of a POST body. Only `application/json` is read: a cross-origin page may send `text/plain`
    without a CORS preflight, so anything else is refused before the body is read."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ServeError(
            "unsupported_media_type", f"send the body as application/json, not {media_type or 'no content type'}"
        )
    body = await request.body()  # at most serve.max_body_bytes: the guard has read it
    if len(body) > 65536:  # parsing a large body takes milliseconds: off the event loop
        return await asyncio.to_thread(decode_json_object, body, "request body")
    return decode_json_object(body, "request body")


def openai_call(state: ServerState, data: dict) -> OpenAICall:
    """The fields this server honours; others OpenAI clients send by habit (user, presence_penalty...) are ignored.
    A `model` other than the one served is refused as the OpenAI API does (404 `model_not_found`)."""
    model = data.get("model")
    if model is not None and model != state.model_name:
        raise ServeError(
            "model_not_found",
            f"the model {json.dumps(model)[:80]} does not exist: this server serves {state.model_name!r} "
            "(GET /v1/models)",
        )
    if data.get("n", 1) != 1:
        raise ServeError("invalid_field", f"'n' must be 1: one completion per request, got {data.get('n')!r}")
    if data.get("stop") not in (None, [], ""):
        raise ServeError(
            "invalid_field", "'stop' sequences are not supported: the model stops at its end-of-turn token"
        )
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    return OpenAICall(
        max_new_tokens=check_max_new_tokens(max_tokens, state.limits, "max_tokens"),
        sampling=check_sampling(data, state.limits.default_sampling),
        stream=check_bool(data, "stream"),
        use_retrieval=check_bool(data, "use_retrieval", default=state.limits.retrieval_default),
        compare=check_bool(data, "compare"),
    )


async def prepare(state: ServerState, messages, raw_text, call: OpenAICall) -> PreparedPrompt:
    return await prepare_async(state, messages, raw_text, call.use_retrieval, call.max_new_tokens)


async def cancel_on_disconnect(request: Request, engine: Engine, ticket, every_s: float = 0.1) -> None:
    """Cancel a request whose client has gone, checking every `every_s` seconds until it ends."""
    while not ticket.finished:
        if await request.is_disconnected():
            engine.cancel(ticket, "the client is gone")
            return
        await asyncio.sleep(every_s)


async def respond(
    state: ServerState,
    call: OpenAICall,
    prepared: PreparedPrompt,
    chat: bool,
    user_text: str,
    request: Request,
    messages: list | None = None,
):
    """The completion as one JSON body, or as server-sent events; with the constitution on, the text is checked
    whole first (and a stream carries it as one chunk). `user_text` is what the constitution's judges read. A
    request whose client disconnects stops generating within 0.1 s: a stream when its next chunk cannot be sent,
    a plain body through `cancel_on_disconnect`. With feedback on, the answer is remembered under the body's `id`
    (`messages`: the conversation; None for a raw completion)."""
    if call.compare:
        return await compare_body(state, call, prepared, chat, user_text, messages)
    generation = GenerationRequest(
        tuple(prepared.ids), call.max_new_tokens, call.sampling, prepared.stop_ids, state.config.request_timeout_s
    )
    stream = EventStream(state.engine, generation)  # submitted now: `overloaded` is an HTTP status, not a stream error
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    sources = [{"id": h.id, "text": h.text, "score": round(h.score, 4)} for h in prepared.sources]
    head = {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": state.model_name,
    }
    check = functools.partial(check_response, state, ident, user_text) if state.constitution is not None else None
    remember = None  # remember(text, finish_reason=...) with feedback on
    if state.feedback is not None:
        remember = functools.partial(
            state.feedback.remember, state.sides[0], user_text, messages, sources,
            sampling=call.sampling, max_new_tokens=call.max_new_tokens, completion_id=ident,
        )  # fmt: skip
    if call.stream:
        return StreamingResponse(sse(stream, head, chat, sources, check, remember), media_type="text/event-stream")
    pieces, done = [], None
    watcher = asyncio.create_task(cancel_on_disconnect(request, state.engine, stream.ticket))
    try:
        async for event in stream.events():
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
            elif isinstance(event, ErrorEvent):
                raise ServeError(event.code, event.message)
            else:
                done = event
    finally:
        watcher.cancel()
    text = "".join(pieces)
    checked = check(text) if check is not None else None
    if checked is not None:
        text = checked.text
    if remember is not None:
        remember(text, finish_reason=done.finish_reason)
    choice = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    body = {**head, "choices": [choice], "usage": done.usage.to_dict()}
    if sources:
        body["sources"] = sources
    if checked is not None:
        body["filtered"] = checked.broken
    return body


async def sse(
    stream: EventStream,
    head: dict,
    chat: bool,
    sources: list[dict],
    check: Callable[[str], Checked] | None = None,
    remember: Callable[..., str] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shape, closed by `data: [DONE]`. With `check` (the constitution on)
    the text is held back, checked whole, and sent as one chunk before the finish chunk."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(piece: str | None, finish: str | None, **extra) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if piece is None else {"content": piece}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"

    if chat:
        first = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
        yield f"data: {json.dumps({**head, 'choices': [first], **({'sources': sources} if sources else {})})}\n\n"
    pieces: list[str] = []
    async for event in stream.events():
        if isinstance(event, TokenEvent):
            pieces.append(event.text)
            if check is None:
                yield chunk(event.text, None)
        elif isinstance(event, DoneEvent):
            extra, text = {}, "".join(pieces)
            if check is not None:
                checked = check(text)
                text = checked.text
                yield chunk(checked.text, None)
                extra["filtered"] = checked.broken
            if remember is not None:  # before the finish chunk: a vote sent on seeing it finds the answer
                remember(text, finish_reason=event.finish_reason)
            yield chunk(None, event.finish_reason, usage=event.usage.to_dict(), **extra)
        else:
            yield f"data: {json.dumps(ServeError(event.code, event.message).to_openai())}\n\n"
            return
    yield "data: [DONE]\n\n"


async def compare_body(
    state: ServerState, call: OpenAICall, prepared: PreparedPrompt, chat: bool, user_text: str, messages
) -> dict:
    """A `compare` request's body: two `choices`, in random order, each with its own completion `id` to vote with,
    and no model name (blind)."""
    if call.stream:
        raise ServeError("invalid_field", "'compare' answers arrive whole: send it with 'stream': false")
    answers = await compare_answers(state, call.max_new_tokens, call.sampling, prepared, messages, user_text)
    choices = []
    for i, answer in enumerate(answers):
        choice = {"index": i, "id": answer.id, "finish_reason": answer.finish_reason, "usage": answer.usage}
        choice.update({"message": {"role": "assistant", "content": answer.text}} if chat else {"text": answer.text})
        choices.append(choice)
    body = {"id": f"cmp-{uuid.uuid4().hex[:24]}", "object": "compare", "created": int(time.time()), "choices": choices}
    if prepared.sources:
        body["sources"] = [{"id": h.id, "text": h.text, "score": round(h.score, 4)} for h in prepared.sources]
    return body
