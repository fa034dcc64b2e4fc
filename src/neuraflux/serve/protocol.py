"""The wire protocol: error codes, client messages checked field by field, and prompts built from them.

WebSocket `/ws`, JSON text messages. Client to server::

    {"type": "generate", "id": "a1", "prompt": "..." | "messages": [{"role", "content"}, ...],
     "max_new_tokens": 64, "temperature": 0.7, "top_k": null, "top_p": 0.95, "use_retrieval": true}
    {"type": "cancel", "id": "a1"}

Server to client: `token` {id, text}, `sources` {id, docs: [{id, text, score}]}, `done` {id, finish_reason,
usage}, `error` {id, code, message}. `prompt` is one user turn in the chat format; `messages` a conversation.

With a constitution (serve.constitution set), no text leaves the server before it is checked: a request's tokens
are held back, the whole response goes through the filter when generation ends, and the (possibly revised) text
arrives as ONE `token` message, then `done` with one more field, `filtered`: the ids of the principles the
generated response broke (`[]` when it was sent as generated)::

    {"type": "token", "id": "a1", "text": "I can't help with that."}
    {"type": "done", "id": "a1", "finish_reason": "stop", "usage": {...}, "filtered": ["no_unsafe_compliance"]}

The HTTP endpoints do the same: the body's text is the checked one, with `filtered` beside `choices`, and
`stream: true` sends it as one chunk, then the finish chunk (which carries `filtered`). `usage` still counts the
tokens generated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from neuraflux.chat import ROLE_TOKENS, Message, escape_special, render_prompt
from neuraflux.retrieval import Hit

# Every error the server sends, with the HTTP status the OpenAI-style endpoints give it.
ERROR_CODES: dict[str, int] = {
    "bad_json": 400,  # not JSON, or not a JSON object
    "unknown_type": 400,  # "type" missing or not generate/cancel
    "invalid_field": 400,  # a field missing, of the wrong type, out of range, or unknown
    "duplicate_id": 400,  # a generate whose id is already in flight on this connection
    "prompt_too_long": 400,
    "max_new_tokens_too_large": 400,
    "retrieval_unavailable": 400,  # use_retrieval on a server started without a retrieval store
    "unauthorized": 401,
    "forbidden": 403,  # a Host or web Origin this server does not answer (serve.allowed_hosts / allowed_origins)
    "request_timeout": 408,  # a body slower than serve.read_timeout_s
    "request_too_large": 413,  # a body or WebSocket message over serve.max_body_bytes
    "unsupported_media_type": 415,  # a POST body not sent as application/json
    "not_found": 404,  # cancel of an id not in flight
    "model_not_found": 404,  # an OpenAI-style request naming a model this server does not serve
    "cancelled": 499,  # the client cancelled (or went away)
    "overloaded": 503,  # every slot busy and the queue full
    "timeout": 504,  # over serve.request_timeout_s
    "internal": 500,  # the model failed; the server keeps serving
    "feedback_disabled": 404,  # a feedback call to a server started without serve.feedback_db
    "unknown_completion": 404,  # feedback naming a completion id the feedback database does not hold
    "feedback_unavailable": 503,  # the feedback database is locked past its timeout, damaged, or of a newer schema
}

GENERATE_FIELDS = (
    "type",
    "id",
    "prompt",
    "messages",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "use_retrieval",
    "compare",
)


class ServeError(Exception):
    """A request-level failure with a protocol error code; the connection and the server carry on."""

    def __init__(self, code: str, message: str, request_id: Any = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; known: {sorted(ERROR_CODES)}")
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id

    @property
    def status(self) -> int:
        return ERROR_CODES[self.code]

    def to_ws(self) -> dict:
        return {"type": "error", "id": self.request_id, "code": self.code, "message": self.message}

    def to_openai(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error" if self.status < 500 else "server_error",
                "param": None,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: the config's limits, already capped to the model."""

    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    default_sampling: Sampling
    # a prompt's text longer than this cannot fit max_prompt_tokens (max_prompt_tokens * the tokenizer's most
    # characters per token): refused before it is tokenized
    max_prompt_chars: int | None = None
    max_message_bytes: int | None = None  # a WebSocket message larger than this is refused before it is parsed
    retrieval_default: bool = False  # a request that does not say retrieves when the server has a store


@dataclass(frozen=True)
class GenerateMessage:
    id: str | int
    prompt: str | None  # exactly one of prompt and messages is set
    messages: tuple[Message, ...] | None
    max_new_tokens: int
    sampling: Sampling
    use_retrieval: bool
    compare: bool = False  # two blind answers in one `answers` message (serve/feedback.py)

    def conversation(self) -> list[Message]:
        return list(self.messages) if self.messages is not None else [Message("user", self.prompt)]


@dataclass(frozen=True)
class CancelMessage:
    id: str | int


def decode_json_object(raw: str | bytes, what: str) -> dict:
    """A JSON object from a client, or ServeError `bad_json` naming why: not JSON, nested too deeply for the parser
    (it would otherwise raise RecursionError, a bare 500), a string holding a lone surrogate (which no tokenizer or
    UTF-8 writer can take later), or not an object. `what` names the source ("request body", "message")."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ServeError("bad_json", f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        raise ServeError("bad_json", f"{what} is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise ServeError("bad_json", f"{what} must be a JSON object, got {type(data).__name__}")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        bad = err.object[err.start : err.end].encode("unicode_escape").decode()
        raise ServeError("bad_json", f"{what} holds a lone surrogate ({bad}), not text") from None
    except RecursionError:  # deep, but within what the parser accepted
        raise ServeError("bad_json", f"{what} is nested too deeply to parse") from None
    return data


@dataclass(frozen=True)
class FeedbackMessage:
    data: dict  # the vote's fields, checked by serve/feedback.py's parse_vote


def parse_client_message(raw: str | bytes, limits: Limits) -> GenerateMessage | CancelMessage | FeedbackMessage:
    """One WebSocket message, checked before any work; raises ServeError naming the bad field."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if limits.max_message_bytes is not None and size > limits.max_message_bytes:
        raise ServeError(
            "request_too_large", f"the message is over {limits.max_message_bytes} bytes (serve.max_body_bytes)"
        )
    data = decode_json_object(raw, "message")
    request_id = data.get("id")
    kind = data.get("type")
    if kind not in ("generate", "cancel", "feedback"):
        raise ServeError("unknown_type", f"message type {kind!r} is not 'generate', 'cancel' or 'feedback'", request_id)
    if kind == "feedback":  # its `id` names a completion, not a request
        return FeedbackMessage(data)
    request_id = check_id(data)
    if kind == "cancel":
        extra = sorted(set(data) - {"type", "id"})
        if extra:
            raise ServeError("invalid_field", f"cancel takes only type and id, got unknown fields {extra}", request_id)
        return CancelMessage(request_id)
    extra = sorted(set(data) - set(GENERATE_FIELDS))
    if extra:
        raise ServeError(
            "invalid_field", f"unknown fields {extra}; generate takes {list(GENERATE_FIELDS[1:])}", request_id
        )
    if ("prompt" in data) == ("messages" in data):
        raise ServeError("invalid_field", "give exactly one of 'prompt' (a string) and 'messages' (a list)", request_id)
    prompt, messages = None, None
    if "prompt" in data:
        prompt = data["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ServeError("invalid_field", f"'prompt' must be a non-empty string, got {_show(prompt)}", request_id)
    else:
        messages = tuple(parse_messages(data["messages"], request_id))
    return GenerateMessage(
        id=request_id,
        prompt=prompt,
        messages=messages,
        max_new_tokens=check_max_new_tokens(data.get("max_new_tokens"), limits, "max_new_tokens", request_id),
        sampling=check_sampling(data, limits.default_sampling, request_id),
        use_retrieval=check_bool(data, "use_retrieval", request_id, default=limits.retrieval_default),
        compare=check_bool(data, "compare", request_id),
    )


def check_id(data: dict) -> str | int:
    request_id = data.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int) or request_id == "":
        raise ServeError("invalid_field", f"'id' must be a non-empty string or an integer, got {_show(request_id)}")
    return request_id


def parse_messages(value: Any, request_id: Any = None, system_as_context: bool = False) -> list[Message]:
    """[{role, content}] as chat Messages; OpenAI's `system` role becomes a context turn when allowed."""
    if not isinstance(value, list) or not value:
        raise ServeError("invalid_field", f"'messages' must be a non-empty list, got {_show(value)}", request_id)
    roles = sorted(ROLE_TOKENS) + (["system"] if system_as_context else [])
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise ServeError("invalid_field", f"messages[{i}].role must be one of {roles}, got {_show(m)}", request_id)
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    continue
                text = part.get("text")
                if not isinstance(text, str):
                    raise ServeError(
                        "invalid_field",
                        f"messages[{i}].content[{j}].text must be a string, got {_show(text)}",
                        request_id,
                    )
                texts.append(text)
            content = "".join(texts)
        if not isinstance(content, str):
            raise ServeError(
                "invalid_field", f"messages[{i}].content must be a string, got {_show(content)}", request_id
            )
        out.append(Message("context" if m["role"] == "system" else m["role"], content))
    if not any(m.role == "user" for m in out):
        raise ServeError("invalid_field", "'messages' needs at least one user message", request_id)
    return out


def last_user_text(conversation: list[Message] | tuple[Message, ...]) -> str:
    """The last user turn's content: what retrieval searches with and the constitution's judges read."""
    return [m for m in conversation if m.role == "user"][-1].content


def check_max_new_tokens(value: Any, limits: Limits, name: str, request_id: Any = None) -> int:
    if value is None:
        return limits.default_max_new_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ServeError("invalid_field", f"'{name}' must be a positive integer, got {_show(value)}", request_id)
    if value > limits.max_new_tokens:
        raise ServeError(
            "max_new_tokens_too_large",
            f"'{name}' is {value}, over this server's cap of {limits.max_new_tokens} (serve.max_new_tokens)",
            request_id,
        )
    return value


def check_sampling(data: dict, default: Sampling, request_id: Any = None) -> Sampling:
    temperature = data.get("temperature", default.temperature)
    if temperature is None:
        temperature = default.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature < math.inf:
        raise ServeError("invalid_field", f"'temperature' must be a number >= 0, got {_show(temperature)}", request_id)
    top_k = data.get("top_k", default.top_k)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ServeError("invalid_field", f"'top_k' must be a positive integer or null, got {_show(top_k)}", request_id)
    top_p = data.get("top_p", default.top_p)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise ServeError("invalid_field", f"'top_p' must be a number in (0, 1] or null, got {_show(top_p)}", request_id)
    return Sampling(float(temperature), top_k, None if top_p is None else float(top_p))


def check_bool(data: dict, name: str, request_id: Any = None, default: bool = False) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ServeError("invalid_field", f"'{name}' must be true or false, got {_show(value)}", request_id)
    return value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    stop_ids: tuple[int, ...]  # end of turn and end of text for chat; end of text for raw completions
    sources: list[Hit]


def prepare_prompt(
    tokenizer,
    rag,
    limits: Limits,
    messages: list[Message] | None,
    raw_text: str | None,
    use_retrieval: bool,
    max_new_tokens: int,
    request_id: Any = None,
) -> PreparedPrompt:
    """Token ids for a conversation (chat format, optionally with retrieved context) or a raw text.

    `rag` is a NanoRAG or None. Retrieval searches with the last user message; the context budget is NanoRAG's.
    """
    sources: list[Hit] = []
    chars = len(raw_text) if raw_text is not None else sum(len(m.content) for m in messages or ())
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        raise ServeError(
            "prompt_too_long",
            f"the prompt is {chars} characters, more than {limits.max_prompt_tokens} tokens can hold "
            f"(serve.max_prompt_tokens); it was not tokenized",
            request_id,
        )
    if raw_text is not None and not use_retrieval:
        text, stops = escape_special(raw_text), (tokenizer.eos_id,)  # a raw prompt is text, never markup
    else:
        conversation = messages if messages is not None else [Message("user", raw_text)]
        stops = (tokenizer.end_id, tokenizer.eos_id)
        text = render_prompt(conversation)
        if use_retrieval:
            if rag is None:
                raise ServeError(
                    "retrieval_unavailable",
                    "this server has no retrieval store (start it with retrieval=world or a store directory)",
                    request_id,
                )
            question = last_user_text(conversation)
            try:
                hits = rag.retriever.search(question, rag.k)
                text, sources = rag.build_prompt(question, hits, max_new_tokens)
            except ValueError as err:  # the question alone is over the budget, or is empty
                raise ServeError(
                    "prompt_too_long" if "budget" in str(err) else "invalid_field", str(err), request_id
                ) from None
            if len(conversation) > 1:
                context = rag.separator.join(h.text for h in sources) or None
                text = render_prompt(conversation, context=context)
    ids = tokenizer.encode(text)
    if len(ids) > limits.max_prompt_tokens:
        raise ServeError(
            "prompt_too_long",
            f"the prompt is {len(ids)} tokens, over the limit of {limits.max_prompt_tokens} (serve.max_prompt_tokens)",
            request_id,
        )
    return PreparedPrompt(ids, stops, sources)
