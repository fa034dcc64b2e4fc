"""The server's constitutional filter: a checked response arrives whole (one token message, `filtered` on done),
over WebSocket and HTTP; off, tokens stream as before; a bad constitution stops the server before it starts."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the web stack: pip install -e '.[serve]'")

from neuraflux.chat import Message, render_prompt  # noqa: E402
from neuraflux.serve import ServeConfig, create_app, load_serve_config, main  # noqa: E402
from neuraflux.serve.app import load_constitution  # noqa: E402
from neuraflux.world import WorldConfig, generate_world, lexicon  # noqa: E402
from tests.test_serve import BASE, expected_answer, make_client  # noqa: E402
from tests.test_serve_engine import alone, tiny_lm  # noqa: E402

torch.set_num_threads(1)

# Every greedy token of the tiny model is one printable character of "a-z ?.,": `.+` matches any answer, `\d` none.
ALWAYS = """principles:
  - id: always
    text: Nothing may be said.
    check: {type: regex, pattern: '.+'}
    revision: "{refusal}"
"""
NEVER = ALWAYS.replace("always", "no_digits").replace("'.+'", "'\\d'")


@pytest.fixture
def always(tmp_path) -> str:
    path = tmp_path / "always.yaml"
    path.write_text(ALWAYS)
    return str(path)


@pytest.fixture
def never(tmp_path) -> str:
    path = tmp_path / "never.yaml"
    path.write_text(NEVER)
    return str(path)


def ws_messages(client, request: dict) -> list[dict]:
    """Every message of one request, up to and including its done or error."""
    out = []
    with client.websocket_connect("/ws") as ws:
        ws.send_json(request)
        while True:
            out.append(ws.receive_json())
            if out[-1]["type"] in ("done", "error"):
                return out


# ---- WebSocket --------------------------------------------------------------------------------------------------
def test_ws_revised_response_arrives_as_one_token_then_done_with_filtered(always, caplog):
    with caplog.at_level(logging.INFO, logger="neuraflux.serve.app"), make_client(constitution=always) as client:
        msgs = ws_messages(client, {"type": "generate", "id": "a", "prompt": "hi", "max_new_tokens": 6})
    assert [m["type"] for m in msgs] == ["token", "done"]
    assert msgs[0] == {"type": "token", "id": "a", "text": lexicon.REFUSAL}
    assert msgs[1]["filtered"] == ["always"] and msgs[1]["finish_reason"] == "length"
    assert msgs[1]["usage"]["completion_tokens"] == 6  # usage counts what was generated, not what was sent
    assert "request a: the constitution filter revised the response (broke ['always'])" in caplog.text


def test_ws_clean_response_is_held_back_and_sent_whole(never):
    with make_client(constitution=never) as client:
        msgs = ws_messages(client, {"type": "generate", "id": 7, "prompt": "hi", "max_new_tokens": 6})
    # off, these 6 characters come as 6 token messages (test_serve); on, as one, unrevised
    assert msgs[0] == {"type": "token", "id": 7, "text": expected_answer("hi", 6)}
    assert [m["type"] for m in msgs] == ["token", "done"] and msgs[1]["filtered"] == []


def test_ws_without_constitution_streams_every_token_and_done_has_no_filtered():
    with make_client() as client:
        msgs = ws_messages(client, {"type": "generate", "id": "a", "prompt": "hi", "max_new_tokens": 6})
    assert [m["type"] for m in msgs] == ["token"] * 6 + ["done"]
    assert "".join(m["text"] for m in msgs[:-1]) == expected_answer("hi", 6)
    assert set(msgs[-1]) == {"type", "id", "finish_reason", "usage"}


def test_ws_judge_constitution_uses_the_builtin_world_and_matches_filtering_by_hand():
    # `default` has an honesty judge: the server scores against generate_world(WorldConfig()), as retrieval=world
    world = generate_world(WorldConfig())
    constitution = load_constitution("default")
    with make_client(constitution="default") as client:
        assert client.app.state.serve.world is not None
        msgs = ws_messages(
            client,
            {
                "type": "generate",
                "id": "z",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "what is zorn?"},
                ],
                "max_new_tokens": 8,
            },
        )
    model, tok = tiny_lm()
    generated = alone(
        model,
        tok,
        tok.encode(
            render_prompt([Message("user", "hi"), Message("assistant", "hello"), Message("user", "what is zorn?")])
        ),
        8,
    )
    # the judges read the last user turn as the prompt
    expected = constitution.filter("what is zorn?", generated, world)
    assert msgs[0]["text"] == expected.response
    assert msgs[1]["filtered"] == list(dict.fromkeys(v.principle for v in expected.violations))


def test_a_given_world_is_shared_not_generated_again():
    world = generate_world(WorldConfig(n_entities=12))
    model, tok = tiny_lm()
    app = create_app(ServeConfig(constitution="default", temperature=0.0, top_p=None), model, tok, world=world)
    assert app.state.serve.world is world
    assert create_app(BASE, model, tok, world=world).state.serve.world is None  # filter off: the world is unused


# ---- HTTP -------------------------------------------------------------------------------------------------------
def test_http_chat_completion_returns_the_refusal(always):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with make_client(constitution=always) as client:
        body = client.post("/v1/chat/completions", json=request).json()
        with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": lexicon.REFUSAL}
    assert body["filtered"] == ["always"] and body["usage"]["completion_tokens"] == 5
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    # the role chunk, the whole checked text in one chunk, the finish chunk
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant"}, {"content": lexicon.REFUSAL}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["filtered"] == ["always"]


def test_http_completions_clean_text_comes_whole(never):
    model, tok = tiny_lm()
    with make_client(constitution=never) as client:
        body = client.post("/v1/completions", json={"prompt": "the tower", "max_tokens": 5}).json()
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "the tower", "max_tokens": 5, "stream": True}
        ) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    text = alone(model, tok, tok.encode("the tower"), 5)
    assert body["choices"][0]["text"] == text and body["filtered"] == []
    assert [c["choices"][0]["text"] for c in chunks] == [text, ""] and chunks[-1]["filtered"] == []


# ---- config and startup -----------------------------------------------------------------------------------------
def test_config_key_and_default_path(monkeypatch):
    monkeypatch.delenv("NEURAFLUX_API_KEY", raising=False)
    assert load_serve_config().constitution is None
    assert load_serve_config(["constitution=default"]).constitution == "default"
    ids = [p.id for p in load_constitution("default").principles]
    assert ids == ["no_insults", "no_unsafe_compliance", "no_secret_leak", "no_fabrication"]
    assert load_constitution(None) is None
    with pytest.raises(ValueError, match="serve.constitution is empty"):
        ServeConfig(constitution="")


@pytest.mark.parametrize(
    "text, message",
    [
        (ALWAYS.replace("type: regex", "type: vibes"), "principle 'always'.check.type 'vibes' is not one of"),
        (ALWAYS.replace('    revision: "{refusal}"\n', ""), "principle 'always' is missing the field 'revision'"),
        (ALWAYS.replace("{refusal}", "{apology}"), "principle 'always'.revision uses unknown field(s) ['apology']"),
        ("principles: [oops\n", "is not a readable YAML mapping"),
        ("rules: []\n", "expected a 'principles' list"),
    ],
)
def test_malformed_constitution_fails_at_startup(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    model, tok = tiny_lm()
    with pytest.raises(ValueError) as err:
        create_app(ServeConfig(constitution=str(path)), model, tok)
    assert message in str(err.value) and str(path) in str(err.value)
    # the entry point refuses before loading the model (tmp_path holds no run: that would be another error)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path), f"constitution={path}"])
    assert message in str(exit_.value)


def test_missing_constitution_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"serve.constitution: no such file .*nope\.yaml"):
        main(["--model", str(tmp_path), f"constitution={tmp_path / 'nope.yaml'}"])
