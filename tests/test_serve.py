"""The server's protocol through Starlette's TestClient: streaming, cancel, several requests on one socket, every
error code, the OpenAI-shaped endpoints (plain and SSE), the page, the config and the import door."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the web stack: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from neuraflux.chat import Message, render_prompt  # noqa: E402
from neuraflux.retrieval import Retriever  # noqa: E402
from neuraflux.serve import ERROR_CODES, ServeConfig, create_app, load_serve_config, main  # noqa: E402
from neuraflux.serve.config import DEFAULT_CONFIG  # noqa: E402
from tests.test_serve_engine import alone, slow_down, tiny_lm  # noqa: E402

torch.set_num_threads(1)

# Greedy, small limits; the tiny model has 96 positions, so max_prompt_tokens is capped to 95.
BASE = ServeConfig(
    max_prompt_tokens=60,
    max_new_tokens=24,
    default_max_new_tokens=8,
    max_concurrent=4,
    max_queue=4,
    temperature=0.0,
    top_p=None,
    allowed_hosts=["testserver", "127.0.0.1"],  # TestClient's Host, and a live server's (serve/guard.py)
)


def make_client(slow: float = 0.0, retriever=None, **changes) -> TestClient:
    model, tok = tiny_lm()
    if slow:
        slow_down(model, slow)
    app = create_app(dataclasses.replace(BASE, **changes), model, tok, retriever, model_name="tiny")
    return TestClient(app)


def expected_answer(question: str, n: int) -> str:
    model, tok = tiny_lm()
    return alone(model, tok, tok.encode(render_prompt([Message("user", question)])), n)


def until_end(ws, request_id) -> tuple[str, dict]:
    """Collect one request's text until its done or error message (others' messages are ignored)."""
    text = ""
    while True:
        msg = ws.receive_json()
        if msg["id"] != request_id:
            continue
        if msg["type"] == "token":
            text += msg["text"]
        elif msg["type"] in ("done", "error"):
            return text, msg


# ---- streaming, two requests, cancel ------------------------------------------------------------------------
def test_generate_streams_tokens_then_done_with_usage():
    with make_client() as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate", "id": "a", "prompt": "hi", "max_new_tokens": 6})
        pieces = []
        while (msg := ws.receive_json())["type"] == "token":
            pieces.append(msg["text"])
        assert msg["type"] == "done" and msg["id"] == "a" and msg["finish_reason"] == "length"
    assert "".join(pieces) == expected_answer("hi", 6)
    assert len(pieces) == 6  # one printable character per token: each arrives as it is produced
    prompt_tokens = len("BUhiEA")  # <|bos|><|user|>hi<|end|><|assistant|>: one id per special token or character
    assert msg["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}


def test_two_requests_in_flight_on_one_socket_each_get_their_own_answer():
    with make_client(slow=0.002) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate", "id": 1, "prompt": "what is a tower?", "max_new_tokens": 10})
        ws.send_json(
            {"type": "generate", "id": "two", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 7}
        )
        texts, ends, order = {1: "", "two": ""}, {}, []
        while len(ends) < 2:
            msg = ws.receive_json()
            order.append(msg["id"])
            if msg["type"] == "token":
                texts[msg["id"]] += msg["text"]
            else:
                ends[msg["id"]] = msg
    assert texts == {1: expected_answer("what is a tower?", 10), "two": expected_answer("hi", 7)}
    assert ends[1]["usage"]["completion_tokens"] == 10 and ends["two"]["usage"]["completion_tokens"] == 7
    first_done = order.index(ends["two"]["id"], order.index("two"))  # tokens of both interleave before either ends
    assert 1 in order[:first_done]


def test_cancel_stops_the_request_and_the_socket_keeps_serving():
    with make_client(slow=0.01) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate", "id": "long", "prompt": "hi", "max_new_tokens": 24})
        assert ws.receive_json()["type"] == "token"
        ws.send_json({"type": "cancel", "id": "long"})
        text, end = until_end(ws, "long")
        assert end == {"type": "error", "id": "long", "code": "cancelled", "message": "cancelled by the client"}
        assert len(text) < 23
        ws.send_json({"type": "generate", "id": "next", "prompt": "hi", "max_new_tokens": 3})
        text, end = until_end(ws, "next")
        assert end["type"] == "done" and text == expected_answer("hi", 3)
        assert client.app.state.serve.engine.stats().active == 0


def test_disconnect_mid_stream_cancels_and_frees_the_slot():
    with make_client(slow=0.01) as client:
        engine = client.app.state.serve.engine
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "generate", "id": "x", "prompt": "hi", "max_new_tokens": 24})
            assert ws.receive_json()["type"] == "token"
            assert engine.stats().active == 1
        deadline = time.monotonic() + 5
        while engine.stats().active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().active == 0
        assert engine.stats().tokens < 24  # stopped early, not run to max_new_tokens
        assert client.get("/health").json()["status"] == "ok"  # and the server carries on


def test_retrieval_sends_sources_before_tokens():
    store = Retriever()
    store.add(["the tower of zorn is tall", "bread is baked", "zorn has a tall tower of stone"], ids=["d1", "d2", "d3"])
    with (
        make_client(retriever=store, retrieval_k=2, max_prompt_tokens=90) as client,
        client.websocket_connect("/ws") as ws,
    ):
        ws.send_json(
            {
                "type": "generate",
                "id": "q",
                "prompt": "how tall is the tower of zorn?",
                "use_retrieval": True,
                "max_new_tokens": 3,
            }
        )
        first = ws.receive_json()
        _, end = until_end(ws, "q")
    assert first["type"] == "sources" and first["id"] == "q"
    assert [d["id"] for d in first["docs"]] == [h.id for h in store.search("how tall is the tower of zorn?", 2)]
    assert first["docs"][0]["id"] in ("d1", "d3") and first["docs"][0]["score"] >= first["docs"][1]["score"]
    assert end["type"] == "done"


def test_a_server_with_a_store_retrieves_unless_a_request_opts_out():
    store = Retriever()
    store.add(["the tower of zorn is tall", "bread is baked"], ids=["d1", "d2"])
    body = {"messages": [{"role": "user", "content": "how tall is zorn?"}], "max_tokens": 2}
    with make_client(retriever=store, retrieval_k=1, max_prompt_tokens=90) as client:
        assert client.get("/health").json()["retrieval"] is True  # what the page's checkbox starts as
        assert [d["id"] for d in client.post("/v1/chat/completions", json=body).json()["sources"]] == ["d1"]
        assert "sources" not in client.post("/v1/chat/completions", json={**body, "use_retrieval": False}).json()
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "generate", "id": "q", "prompt": "how tall is zorn?", "max_new_tokens": 2})
            assert ws.receive_json()["type"] == "sources"
            until_end(ws, "q")
            ws.send_json({**GEN, "id": "r", "use_retrieval": False, "max_new_tokens": 2})
            assert ws.receive_json()["type"] == "token"  # no sources first
            until_end(ws, "r")
    with make_client() as client:  # no store: nothing to retrieve, and no error for not asking
        health = client.get("/health").json()
        # no feedback_db: the page hides its rating controls; a float model reports no quantization
        assert health["retrieval"] is False and health["feedback"] is False and health["quantization"] is None
        assert "sources" not in client.post("/v1/chat/completions", json=body).json()


# ---- every error code -----------------------------------------------------------------------------------------
def ws_error(payload, client_kw=None, before=None, url="/ws") -> dict:
    """Send `before` messages (answers read and dropped), then `payload`; return the first error message."""
    with make_client(**(client_kw or {})) as client, client.websocket_connect(url) as ws:
        for msg in before or []:
            ws.send_json(msg)
        ws.send_text(payload if isinstance(payload, str) else json.dumps(payload))
        while (msg := ws.receive_json())["type"] != "error":
            pass
        return msg


GEN = {"type": "generate", "id": "g", "prompt": "hi"}


def http_error(path: str, body: dict, content_type: str = "application/json", headers=None, client_kw=None) -> dict:
    """An HTTP request's OpenAI-style error as the WebSocket's error message would carry it."""
    with make_client(**(client_kw or {})) as client:
        r = client.post(path, content=json.dumps(body), headers={"content-type": content_type, **(headers or {})})
    error = r.json()["error"]
    assert r.status_code == ERROR_CODES[error["code"]]
    return {"type": "error", "id": None, "code": error["code"], "message": error["message"]}


ERROR_CASES = {
    "unsupported_media_type": (
        lambda: http_error("/v1/completions", {"prompt": "hi"}, content_type="text/plain"),
        None,
        "send the body as application/json, not text/plain",
    ),
    "model_not_found": (
        lambda: http_error("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}),
        None,
        'the model "gpt-4o" does not exist',
    ),
    "bad_json": (lambda: ws_error("{not json"), None, "message is not valid JSON"),
    "unknown_type": (
        lambda: ws_error({"type": "hello", "id": 3}),
        3,
        "message type 'hello' is not 'generate', 'cancel' or 'feedback'",
    ),
    "invalid_field": (
        lambda: ws_error({**GEN, "temperature": "hot"}),
        "g",
        "'temperature' must be a number >= 0, got \"hot\"",
    ),
    "duplicate_id": (
        lambda: ws_error(GEN, {"slow": 0.01}, before=[{**GEN, "max_new_tokens": 24}]),
        "g",
        "a request with id 'g' is already in flight",
    ),
    "prompt_too_long": (
        lambda: ws_error({**GEN, "prompt": "a" * 58}),  # 58 characters and 4 special tokens: 62 tokens
        "g",
        "the prompt is 62 tokens, over the limit of 60 (serve.max_prompt_tokens)",
    ),
    "forbidden": (
        lambda: http_error("/v1/completions", {"prompt": "hi"}, headers={"origin": "http://evil.example"}),
        None,
        "requests from the web origin 'http://evil.example' are refused (serve.allowed_origins)",
    ),
    "request_too_large": (
        lambda: ws_error({**GEN, "prompt": "a" * 2000}, {"max_body_bytes": 1000}),
        None,
        "the message is over 1000 bytes (serve.max_body_bytes)",
    ),
    "request_timeout": (lambda: slow_body_error(), None, "the request body did not arrive within 0.2 s"),
    "max_new_tokens_too_large": (
        lambda: ws_error({**GEN, "max_new_tokens": 25}),
        "g",
        "'max_new_tokens' is 25, over this server's cap of 24 (serve.max_new_tokens)",
    ),
    "retrieval_unavailable": (
        lambda: ws_error({**GEN, "use_retrieval": True}),
        "g",
        "this server has no retrieval store",
    ),
    "unauthorized": (
        lambda: ws_error(GEN, {"api_key": "s3cret"}, url="/ws?api_key=wrong"),
        None,
        "missing or wrong API key",
    ),
    "not_found": (lambda: ws_error({"type": "cancel", "id": "nope"}), "nope", "no request with id 'nope' is in flight"),
    "cancelled": (
        lambda: ws_error({"type": "cancel", "id": "g"}, {"slow": 0.01}, before=[{**GEN, "max_new_tokens": 24}]),
        "g",
        "cancelled by the client",
    ),
    "overloaded": (
        lambda: ws_error(
            {**GEN, "id": "h"},
            {"slow": 0.01, "max_concurrent": 1, "max_queue": 0},
            before=[{**GEN, "max_new_tokens": 24}],
        ),
        "h",
        "1 requests are in flight, the limit is max_concurrent (1) + max_queue (0)",
    ),
    "timeout": (lambda: ws_error(GEN, {"request_timeout_s": 1e-9}), "g", "(serve.request_timeout_s)"),
    "internal": (lambda: internal_error(), "g", "generation failed: RuntimeError: the model broke"),
    # human feedback: tests/test_feedback.py tests each further
    "feedback_disabled": (
        lambda: http_error("/v1/feedback", {"id": "x", "rating": "up"}),
        None,
        "start it with feedback_db=PATH",
    ),
    "unknown_completion": (
        lambda: ws_error({"type": "feedback", "id": "x", "rating": "up"}, {"feedback_db": feedback_db()}),
        "x",
        "no completion with id 'x'",
    ),
    "feedback_unavailable": (
        lambda: http_error(
            "/v1/feedback", {"id": "x", "rating": "up"}, client_kw={"feedback_db": feedback_db(b"not sqlite" * 99)}
        ),
        None,
        "the file is damaged or is not a feedback database",
    ),
}


def feedback_db(content: bytes | None = None) -> str:
    """A feedback database path in a fresh directory: absent (created on first use), or holding `content`."""
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "feedback.sqlite"
    if content is not None:
        path.write_bytes(content)
    return str(path)


def slow_body_error() -> dict:
    """A body that never finishes arriving, driven through the app's ASGI interface (a test client cannot trickle)."""
    import asyncio

    model, tok = tiny_lm()
    app = create_app(dataclasses.replace(BASE, read_timeout_s=0.2), model, tok)
    scope = {
        "type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "scheme": "http", "server": ("testserver", 80), "client": ("127.0.0.1", 1), "http_version": "1.1",
        "asgi": {"version": "3.0"}, "root_path": "",
    }  # fmt: skip
    sent: list[dict] = []

    async def receive():
        if not sent and not hasattr(receive, "started"):
            receive.started = True
            return {"type": "http.request", "body": b'{"prompt": ', "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes

    async def send(message):
        sent.append(message)

    async def run():
        start = time.perf_counter()
        await app(scope, receive, send)
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    assert elapsed < 1.0 and sent[0]["status"] == 408
    error = json.loads(sent[1]["body"])["error"]
    return {"type": "error", "id": None, "code": error["code"], "message": error["message"]}


def internal_error() -> dict:
    model, tok = tiny_lm()

    def explode(*_):
        raise RuntimeError("the model broke")

    model.transformer.register_forward_pre_hook(explode)
    with TestClient(create_app(BASE, model, tok)) as client, client.websocket_connect("/ws") as ws:
        ws.send_json(GEN)
        msg = ws.receive_json()
        ws.send_json({"type": "cancel", "id": "zzz"})  # the connection still answers after the failure
        assert ws.receive_json()["code"] == "not_found"
        return msg


def test_every_error_code_has_a_test():
    assert set(ERROR_CASES) == set(ERROR_CODES)


@pytest.mark.parametrize("code", sorted(ERROR_CASES))
def test_error_code(code):
    run, request_id, message = ERROR_CASES[code]
    msg = run()
    assert msg["type"] == "error" and msg["code"] == code, msg
    assert msg["id"] == request_id
    assert message in msg["message"]


@pytest.mark.parametrize(
    "payload, message",
    [
        ("[1, 2]", "message must be a JSON object, got list"),
        ({"type": "generate", "prompt": "hi"}, "'id' must be a non-empty string or an integer, got null"),
        ({"type": "generate", "id": True, "prompt": "hi"}, "'id' must be a non-empty string or an integer, got true"),
        ({"type": "generate", "id": "g"}, "give exactly one of 'prompt' (a string) and 'messages' (a list)"),
        ({**GEN, "messages": []}, "give exactly one of 'prompt'"),
        (
            {"type": "generate", "id": "g", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role must be one of",
        ),
        (
            {"type": "generate", "id": "g", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content must be a string, got 5",
        ),
        ({**GEN, "max_new_tokens": 0}, "'max_new_tokens' must be a positive integer, got 0"),
        ({**GEN, "max_new_tokens": 2.5}, "'max_new_tokens' must be a positive integer, got 2.5"),
        ({**GEN, "top_k": 0}, "'top_k' must be a positive integer or null, got 0"),
        ({**GEN, "top_p": 1.5}, "'top_p' must be a number in (0, 1] or null, got 1.5"),
        ({**GEN, "use_retrieval": "yes"}, "'use_retrieval' must be true or false, got \"yes\""),
        ({**GEN, "max_tokens": 5}, "unknown fields ['max_tokens']"),
        ({"type": "cancel", "id": "g", "now": True}, "cancel takes only type and id, got unknown fields ['now']"),
    ],
)
def test_bad_fields_are_named(payload, message):
    msg = ws_error(payload)
    assert msg["code"] in ("bad_json", "invalid_field") and message in msg["message"], msg


def test_wrong_key_closes_the_socket_and_the_right_key_works():
    from starlette.websockets import WebSocketDisconnect

    with make_client(api_key="s3cret") as client:
        with client.websocket_connect("/ws") as ws:
            assert ws.receive_json()["code"] == "unauthorized"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008
        with client.websocket_connect("/ws", headers={"Authorization": "Bearer s3cret"}) as ws:
            ws.send_json({**GEN, "max_new_tokens": 2})
            assert until_end(ws, "g")[1]["type"] == "done"


# ---- OpenAI-shaped HTTP -----------------------------------------------------------------------------------------
def test_health_and_models():
    with make_client() as client:
        assert client.get("/health").json() == {
            "status": "ok",
            "model": "tiny",
            "active": 0,
            "queued": 0,
            "slots": 4,
            "max_queue": 4,
            "retrieval": False,
            "feedback": False,
            "quantization": None,
        }
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_completions_continue_raw_text():
    model, tok = tiny_lm()
    with make_client() as client:
        body = client.post("/v1/completions", json={"model": "tiny", "prompt": "the tower", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == alone(model, tok, tok.encode("the tower"), 5)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def test_an_unknown_model_gets_404_model_not_found_as_the_openai_api_does():
    with make_client() as client:
        for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": [
                {"role": "user", "content": "hi"}]})):  # fmt: skip
            r = client.post(path, json={**body, "model": "gpt-4o", "max_tokens": 2})
            assert r.status_code == 404, path
            error = r.json()["error"]
            assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
            assert error["message"] == "the model \"gpt-4o\" does not exist: this server serves 'tiny' (GET /v1/models)"
        # the served name, or none at all, is accepted
        assert (
            client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": "tiny"}).status_code == 200
        )
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_openai_client_shaped_chat_request_plain_and_streamed_agree():
    # what openai-python sends: bearer key, its user agent, a system message and fields this server ignores
    headers = {"Authorization": "Bearer k", "User-Agent": "OpenAI/Python 1.40.0", "Content-Type": "application/json"}
    request = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        "max_tokens": 6,
        "temperature": 0,
        "n": 1,
        "presence_penalty": 0,
        "user": "u1",
        "stream": False,
    }
    model, tok = tiny_lm()
    ids = tok.encode(render_prompt([Message("context", "be brief"), Message("user", "hi")]))
    with make_client(api_key="k") as client:
        plain = client.post("/v1/chat/completions", json=request, headers=headers).json()
        with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}, headers=headers) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": alone(model, tok, ids, 6)}
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completions_stream_as_server_sent_events():
    with (
        make_client() as client,
        client.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 4, "stream": True}) as r,
    ):
        lines = [line for line in r.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    model, tok = tiny_lm()
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone(model, tok, tok.encode("abc"), 4)
    assert len(chunks) == 5 and chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "path, body, status, code, message",
    [
        ("/v1/completions", b"{oops", 400, "bad_json", "request body is not valid JSON"),
        ("/v1/completions", {"prompt": 3}, 400, "invalid_field", "'prompt' must be a non-empty string"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 99}, 400, "max_new_tokens_too_large", "cap of 24"),
        ("/v1/completions", {"prompt": "a", "n": 2}, 400, "invalid_field", "'n' must be 1"),
        (
            "/v1/completions",
            {"prompt": "a", "stop": ["\n"]},
            400,
            "invalid_field",
            "'stop' sequences are not supported",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "x"}]},
            400,
            "invalid_field",
            "'messages' needs at least one user message",
        ),
        # over the characters 60 tokens can hold: refused before it is tokenized
        ("/v1/completions", {"prompt": "a" * 80}, 400, "prompt_too_long", "80 characters, more than 60 tokens"),
    ],
)
def test_http_errors_have_openai_shape_and_status(path, body, status, code, message):
    with make_client() as client:
        if isinstance(body, bytes):  # malformed JSON, sent as JSON (an untyped body is refused earlier: 415)
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and message in err["message"] and err["type"] == "invalid_request_error"


def test_http_unauthorized_and_overloaded():
    with make_client(api_key="k", slow=0.01, max_concurrent=1, max_queue=0) as client:
        assert client.get("/v1/models").status_code == 401
        assert (
            client.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer no"}).json()[
                "error"
            ]["code"]
            == "unauthorized"
        )
        with client.websocket_connect("/ws?api_key=k") as ws:
            ws.send_json({**GEN, "max_new_tokens": 24})
            ws.receive_json()  # the only slot is now busy
            r = client.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer k"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"


# ---- the page, the config, the entry point ----------------------------------------------------------------------
def test_page_and_its_assets_are_served():
    with make_client() as client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="stop"' in page.text and 'id="retrieval"' in page.text
        assert "new WebSocket" in client.get("/static/app.js").text
        assert client.get("/static/style.css").status_code == 200


def test_config_file_overrides_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("NEURAFLUX_API_KEY", raising=False)
    assert load_serve_config() == ServeConfig()  # the YAML holds the dataclass defaults, typed once each
    assert DEFAULT_CONFIG.is_file()
    monkeypatch.setenv("NEURAFLUX_API_KEY", "from-env")
    cfg = load_serve_config(["max_concurrent=3", "retrieval=world"])
    assert (cfg.max_concurrent, cfg.retrieval, cfg.api_key, cfg.host) == (3, "world", "from-env", "127.0.0.1")


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_concurent=3", "serve.max_concurent: Key 'max_concurent' not in 'ServeConfig'"),
        ("port=abc", "serve.port: Value 'abc' of type 'str' could not be converted to Integer"),
        ("max_queue=-1", "serve.max_queue must be an integer >= 0, got -1"),
        ("default_max_new_tokens=999", "serve.default_max_new_tokens (999) must be <= serve.max_new_tokens (256)"),
        ("request_timeout_s=0", "serve.request_timeout_s must be a positive number of seconds, got 0.0"),
        ("top_p=2", "serve.top_p must be in (0, 1] or null, got 2.0"),
        ("compile=maybe", "serve.compile: Value 'maybe' is not a valid bool"),
        ("max_concurrent", "override 'max_concurrent' is not key=value"),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(ValueError) as err:
        load_serve_config([override])
    assert message in str(err.value)


def test_main_refuses_bad_input_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="no such run directory"):
        main(["--model", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="serve.max_queue must be an integer >= 0"):
        main(["--model", str(tmp_path), "max_queue=-2"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["--model", str(tmp_path), "--config", str(tmp_path / "nope.yaml")])


def test_import_without_the_web_stack_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "neuraflux.serve" or m.startswith("neuraflux.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[serve\]"'):
        importlib.import_module("neuraflux.serve")


@pytest.mark.parametrize(
    "body, code, message",
    [
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}', "invalid_field",
         "messages[0].content[0].text must be a string, got null"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "invalid_field",
         "messages[0].content[0].text must be a string, got 5"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}', "invalid_field",
         'messages[0].content[0].text must be a string, got {"a": 1}'),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "bad_json",
         "request body holds a lone surrogate (\\ud800), not text"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "bad_json",
         "request body is nested too deeply to parse"),
    ],
    ids=["text null", "text number", "text object", "lone surrogate", "nested 100k deep"],
)  # fmt: skip
def test_malformed_requests_get_400_in_the_openai_error_body_not_a_500(body, code, message):
    with make_client() as client:
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == {
            "message": message, "type": "invalid_request_error", "param": None, "code": code,
        }  # fmt: skip
        assert client.get("/health").status_code == 200


def test_a_message_nested_100k_deep_is_an_error_and_the_socket_lives_on():
    deep = '{"type": "generate", "id": 1, "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with make_client() as client, client.websocket_connect("/ws") as ws:
        ws.send_text(deep)
        assert ws.receive_json() == {
            "type": "error", "id": None, "code": "bad_json", "message": "message is nested too deeply to parse"
        }  # fmt: skip
        ws.send_text(json.dumps({"type": "generate", "id": 2, "prompt": "hi", "max_new_tokens": 2}))
        first = ws.receive_json()
        assert first["id"] == 2 and first["type"] in ("token", "done")


def test_a_plain_request_whose_client_disconnects_stops_within_half_a_second():
    # a real server on loopback: the test client cannot drop a connection mid-request the way a browser or curl does
    import socket
    import threading

    import uvicorn

    model, tok = tiny_lm()
    slow_down(model, 0.05)  # 20 tokens/s: 24 tokens would take over a second
    app = create_app(BASE, model, tok, model_name="tiny")
    engine = app.state.serve.engine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        body = json.dumps({"prompt": "the tower", "max_tokens": 24}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(head + body)
        deadline = time.monotonic() + 5
        while engine.stats().tokens < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().active == 1
        client.close()  # the client gives up mid-answer
        gone = time.monotonic()
        while engine.stats().active and time.monotonic() < gone + 5:
            time.sleep(0.01)
        stopped_after = time.monotonic() - gone
        assert engine.stats().active == 0 and stopped_after < 0.5, stopped_after
        assert engine.stats().tokens < 24  # it did not run on to max_tokens
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_api_docs_are_behind_the_key_when_one_is_set():
    with make_client(api_key="k") as client:
        assert client.get("/docs").status_code == 401 and client.get("/openapi.json").status_code == 401
        assert client.get("/openapi.json").json()["error"]["code"] == "unauthorized"
        schema = client.get("/openapi.json", headers={"Authorization": "Bearer k"})
        assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
        assert client.get("/docs", headers={"Authorization": "Bearer k"}).status_code == 200
    with make_client() as client:  # no key: open, as every other route
        assert (
            client.get("/docs").status_code == 200 and "/v1/completions" in client.get("/openapi.json").json()["paths"]
        )


def test_a_post_body_that_is_not_json_typed_is_refused_before_it_is_read():
    # a page on another origin can POST text/plain without a CORS preflight; this server only reads JSON
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    with make_client() as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            r = client.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", content_type
        ok = client.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200


def test_an_api_key_in_the_query_string_never_reaches_the_access_log():
    import logging

    make_client(api_key="s3cret")  # creating the app installs the filter on uvicorn's access logger
    access = logging.getLogger("uvicorn.access")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    # a handler on the logger itself: uvicorn's own logging config (a server started earlier) stops propagation
    level, access.level = access.level, logging.INFO
    access.addHandler(handler)
    try:
        # the record uvicorn writes for a WebSocket upgrade: client, method, path with query, HTTP version, status
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/ws?api_key=s3cret&x=1", "1.1", 101)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert lines == ['127.0.0.1:5000 - "GET /ws?api_key=***&x=1 HTTP/1.1" 101']
