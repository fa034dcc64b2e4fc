"""Human feedback, the collect side: answers remembered in SQLite, votes of each kind stored with every field, the
last vote wins, the errors (feedback off, unknown id, oversize, bad fields, a locked, damaged or newer database),
16 clients voting at once, stats with a hand-computed Wilson interval, compare mode's blind pairs, and the export
read back by the data modules that train on it."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the feedback tests need the web stack: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from neuraflux.chat import Message, render_prompt  # noqa: E402
from neuraflux.cli import main as cli_main  # noqa: E402
from neuraflux.data.preference import PreferenceDataset  # noqa: E402
from neuraflux.data.sft import SFTDataModule  # noqa: E402
from neuraflux.data.unpaired import read_unpaired_jsonl  # noqa: E402
from neuraflux.feedback.export import export_feedback  # noqa: E402
from neuraflux.feedback.store import (  # noqa: E402
    SCHEMA_VERSION,
    Compare,
    Completion,
    Edit,
    FeedbackStore,
    FeedbackUnavailable,
    Thumbs,
    annotator_of,
    weights_sha256,
    wilson_interval,
)
from neuraflux.retrieval import Retriever  # noqa: E402
from neuraflux.serve import create_app  # noqa: E402
from tests.test_dpo_stage import init_dir  # noqa: E402, F401  (the fixture: an untrained policy with a world tokenizer)
from tests.test_serve import BASE  # noqa: E402
from tests.test_serve_engine import slow_down, tiny_lm  # noqa: E402

torch.set_num_threads(1)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def client_for(db, compare_seed: int | None = None, retriever=None, slow: float = 0.0, **changes) -> TestClient:
    model, tok = tiny_lm()
    if slow:
        slow_down(model, slow)
    other = None
    if compare_seed is not None:
        other_model, other_tok = tiny_lm(seed=compare_seed)
        other = (other_model, other_tok, "other")
    config = dataclasses.replace(BASE, feedback_db=None if db is None else str(db), **changes)
    return TestClient(create_app(config, model, tok, retriever, model_name="tiny", compare_model=other))


def rows(db, table: str) -> list[dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]


def vote(client, body: dict, status: int = 200) -> dict:
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == status, r.text
    return r.json() if status == 200 else r.json()["error"]


# ---- each kind, stored with every field -------------------------------------------------------------------------
def test_each_kind_of_vote_is_stored_with_its_answer_and_every_field(tmp_path):
    db = tmp_path / "fb.sqlite"
    store = Retriever()
    store.add(["the tower of zorn is tall", "bread is baked"], ids=["d1", "d2"])
    with client_for(db, retriever=store, retrieval_k=1, max_prompt_tokens=90) as client:
        body = {"messages": [{"role": "user", "content": "how tall is zorn?"}], "max_tokens": 3, "temperature": 0}
        answer = client.post("/v1/chat/completions", json=body).json()
        second = client.post("/v1/completions", json={"prompt": "raw text", "max_tokens": 2}).json()
        assert vote(client, {"id": answer["id"], "rating": "up", "comment": "good"}) == {
            "object": "feedback", "kind": "thumbs", "vote_id": 1, "replaced": False,
        }  # fmt: skip
        vote(client, {"kind": "edit", "id": answer["id"], "text": "It is tall."})
        vote(client, {"kind": "compare", "ids": [answer["id"], second["id"]], "choice": "b", "comment": "shorter"})
        model = client.app.state.serve.sides[0]
    completion = rows(db, "completions")[0]
    assert completion["id"] == answer["id"] and completion["model"] == model.model == weights_sha256(tiny_lm()[0])
    assert completion["model_name"] == "tiny" and completion["prompt"] == "how tall is zorn?"
    assert json.loads(completion["messages"]) == [{"role": "user", "content": "how tall is zorn?"}]
    assert [s["id"] for s in json.loads(completion["sources"])] == ["d1"]
    assert completion["text"] == answer["choices"][0]["message"]["content"]
    assert json.loads(completion["sampling"]) == {"temperature": 0.0, "top_k": None, "top_p": None, "max_new_tokens": 3}
    assert completion["finish_reason"] == answer["choices"][0]["finish_reason"] and completion["created"] > 1.7e9
    raw = rows(db, "completions")[1]
    assert raw["messages"] is None and raw["prompt"] == "raw text"  # a raw completion has no conversation
    thumbs, edit, compare = rows(db, "votes")
    assert (thumbs["kind"], thumbs["completion_a"], thumbs["rating"], thumbs["comment"]) == (
        "thumbs", answer["id"], "up", "good",
    )  # fmt: skip
    assert thumbs["annotator"] is None and thumbs["created"] == thumbs["updated"]  # no API key: no annotator
    assert (edit["kind"], edit["completion_a"], edit["text"]) == ("edit", answer["id"], "It is tall.")
    assert (compare["completion_a"], compare["completion_b"], compare["choice"], compare["comment"]) == (
        answer["id"], second["id"], "b", "shorter",
    )  # fmt: skip
    assert rows(db, "meta") == [{"key": "schema_version", "value": str(SCHEMA_VERSION)}]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_streamed_and_websocket_answers_can_be_voted_on(tmp_path):
    db = tmp_path / "fb.sqlite"
    with client_for(db) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        vote(client, {"id": chunks[0]["id"], "rating": "down"})
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "generate", "id": "a", "prompt": "hi", "max_new_tokens": 3})
            while (done := ws.receive_json())["type"] != "done":
                pass
            ws.send_json({"type": "feedback", "id": done["completion_id"], "rating": "up"})
            assert ws.receive_json() == {
                "type": "feedback", "id": done["completion_id"], "object": "feedback", "kind": "thumbs",
                "vote_id": 2, "replaced": False,
            }  # fmt: skip
            ws.send_json({"type": "feedback", "id": "nope", "rating": "up"})
            assert ws.receive_json()["code"] == "unknown_completion"
    texts = {r["id"]: r["text"] for r in rows(db, "completions")}
    assert texts[chunks[0]["id"]] == streamed and len(texts[done["completion_id"]]) == 3


# ---- last vote wins, and the annotator ----------------------------------------------------------------------------
def test_a_second_vote_by_the_same_annotator_replaces_the_first(tmp_path):
    db = tmp_path / "fb.sqlite"
    with client_for(db, api_key="s3cret") as client:
        client.headers["authorization"] = "Bearer s3cret"
        a = client.post("/v1/chat/completions", json=CHAT).json()["id"]
        b = client.post("/v1/chat/completions", json=CHAT).json()["id"]
        assert vote(client, {"id": a, "rating": "up"})["replaced"] is False
        assert vote(client, {"id": a, "rating": "down", "comment": "on second thought"})["replaced"] is True
        vote(client, {"kind": "compare", "ids": [a, b], "choice": "a"})
        assert vote(client, {"kind": "compare", "ids": [b, a], "choice": "tie"})["replaced"] is True  # same pair
        stats = client.get("/v1/feedback/stats").json()
    votes = rows(db, "votes")
    assert [(v["kind"], v["rating"], v["choice"]) for v in votes] == [
        ("thumbs", "down", None),
        ("compare", None, "tie"),
    ]
    assert votes[0]["comment"] == "on second thought" and votes[0]["updated"] >= votes[0]["created"]
    assert {v["annotator"] for v in votes} == {annotator_of("s3cret")} and "s3cret" not in annotator_of("s3cret")
    assert stats["kinds"]["thumbs"] == {"total": 1, "up": 0, "down": 1}  # counted once


# ---- what is refused ----------------------------------------------------------------------------------------------
def test_feedback_off_unknown_ids_oversize_text_and_bad_fields_are_refused_by_name(tmp_path):
    with client_for(None) as client:
        assert vote(client, {"id": "x", "rating": "up"}, 404)["code"] == "feedback_disabled"
        assert client.get("/v1/feedback/stats").json()["error"]["code"] == "feedback_disabled"
    with client_for(tmp_path / "fb.sqlite", max_feedback_chars=10) as client:
        a = client.post("/v1/chat/completions", json=CHAT).json()["id"]
        error = vote(client, {"id": "chatcmpl-nope", "rating": "up"}, 404)
        assert error["code"] == "unknown_completion" and "'chatcmpl-nope'" in error["message"]
        error = vote(client, {"kind": "compare", "ids": [a, "nope"], "choice": "a"}, 404)
        assert "'nope'" in error["message"]
        cases = {
            "'comment' is 11 characters, over the limit of 10 (serve.max_feedback_chars)": {
                "id": a, "rating": "up", "comment": "x" * 11,
            },
            "'text' is 11 characters": {"kind": "edit", "id": a, "text": "y" * 11},
            "'rating' must be one of ['up', 'down']": {"id": a, "rating": "meh"},
            "'choice' must be one of": {"kind": "compare", "ids": [a, a + "x"], "choice": "c"},
            "'ids' must be a list of two completion ids": {"kind": "compare", "ids": [a], "choice": "a"},
            "'kind' must be one of": {"kind": "stars", "id": a},
            "unknown fields ['stars']": {"id": a, "rating": "up", "stars": 5},
            "'id' must be a completion id": {"rating": "up"},
            "'text' must be a non-empty string": {"kind": "edit", "id": a, "text": " "},
        }  # fmt: skip
        for message, body in cases.items():
            error = vote(client, body, 400)
            assert error["code"] == "invalid_field" and message in error["message"], (body, error)
        r = client.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"})
        assert r.json()["error"]["code"] == "bad_json"
        assert client.get("/v1/feedback/stats").json()["kinds"]["thumbs"]["total"] == 0  # nothing half-stored


def test_a_newer_schema_is_refused_by_name(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    FeedbackStore(db).open().close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(
        FeedbackUnavailable, match=f"schema version 99 is newer than this neuraflux's \\({SCHEMA_VERSION}"
    ):
        FeedbackStore(db).open()
    with client_for(db) as client:
        a = client.post("/v1/chat/completions", json=CHAT).json()["id"]  # answering goes on
        assert "schema version 99" in vote(client, {"id": a, "rating": "up"}, 503)["message"]
    from neuraflux.serve import main as serve_main

    with pytest.raises(SystemExit, match="serve.feedback_db: .*schema version 99"):
        serve_main(["--model", str(tmp_path / "no-model-needed"), f"feedback_db={db}"])


def test_a_damaged_file_answers_feedback_unavailable_and_the_server_carries_on(tmp_path):
    db = tmp_path / "fb.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    with client_for(db) as client:
        answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200
        error = vote(client, {"id": answer.json()["id"], "rating": "up"}, 503)
        assert error["code"] == "feedback_unavailable" and "not a feedback database" in error["message"]
        assert client.get("/v1/feedback/stats").status_code == 503
        assert client.get("/health").json()["status"] == "ok"


def test_a_locked_database_refuses_the_vote_in_time_and_loses_nothing(tmp_path):
    db = tmp_path / "fb.sqlite"
    with client_for(db, feedback_timeout_s=0.2) as client:
        first = client.post("/v1/chat/completions", json=CHAT).json()["id"]
        vote(client, {"id": first, "rating": "up"})
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process writing, and not letting go
        second = client.post("/v1/chat/completions", json=CHAT).json()["id"]  # answering does not wait on the lock
        error = vote(client, {"id": second, "rating": "down"}, 503)
        assert error["code"] == "feedback_unavailable" and "locked" in error["message"]
        assert client.get("/health").status_code == 200
        holder.execute("ROLLBACK")
        holder.close()
        vote(client, {"id": second, "rating": "down"})  # the answer was kept in memory; the retry stores both
    assert [r["id"] for r in rows(db, "completions")] == [first, second]
    assert [v["rating"] for v in rows(db, "votes")] == ["up", "down"]


# ---- many clients at once ---------------------------------------------------------------------------------------
def test_16_clients_voting_at_once_store_every_vote(tmp_path):
    db = tmp_path / "fb.sqlite"
    with client_for(db, max_concurrent=4, max_queue=16) as client:
        ids = [client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).json()["id"] for _ in range(16)]
        barrier = threading.Barrier(16)
        statuses = []

        def cast(i: int) -> None:
            barrier.wait()
            r = client.post("/v1/feedback", json={"id": ids[i], "rating": "up" if i % 2 else "down"})
            statuses.append(r.status_code)

        threads = [threading.Thread(target=cast, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.get("/v1/feedback/stats").json()
    assert statuses == [200] * 16
    assert sorted(v["completion_a"] for v in rows(db, "votes")) == sorted(ids)
    assert stats["kinds"]["thumbs"] == {"total": 16, "up": 8, "down": 8}


# ---- compare mode and stats -------------------------------------------------------------------------------------
def test_compare_mode_gives_two_blind_answers_one_from_each_model(tmp_path):
    db = tmp_path / "fb.sqlite"
    with client_for(db, compare_seed=1) as client:
        body = client.post("/v1/chat/completions", json={**CHAT, "compare": True}).json()
        assert body["object"] == "compare" and [c["index"] for c in body["choices"]] == [0, 1]
        assert "tiny" not in json.dumps(body) and "other" not in json.dumps(body)  # blind: no model names
        served, other = client.app.state.serve.sides
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "generate", "id": "c", "prompt": "hi", "max_new_tokens": 4, "compare": True})
            msg = ws.receive_json()
        assert msg["type"] == "answers" and msg["id"] == "c" and len(msg["answers"]) == 2
        assert set(msg["answers"][0]) == {"id", "text", "finish_reason", "usage"}
        refused = client.post("/v1/chat/completions", json={**CHAT, "compare": True, "stream": True}).json()
        assert refused["error"]["code"] == "invalid_field"
    model, tok = tiny_lm()
    other_model, _ = tiny_lm(seed=1)
    by_id = {r["id"]: r for r in rows(db, "completions")}
    for pair in ([c["id"] for c in body["choices"]], [a["id"] for a in msg["answers"]]):
        assert {by_id[i]["model"] for i in pair} == {weights_sha256(model), weights_sha256(other_model)}
        assert by_id[pair[0]]["pair"] == pair[1] and by_id[pair[1]]["pair"] == pair[0]
    assert served.model != other.model
    # each side's text is its model's greedy answer (greedy: BASE has temperature 0)
    from tests.test_serve_engine import alone

    prompt = tok.encode(render_prompt([Message("user", "hi")]))
    texts = {by_id[c["id"]]["model"]: c["message"]["content"] for c in body["choices"]}
    assert texts[served.model] == alone(model, tok, prompt, 4)
    assert texts[other.model] == alone(other_model, tok, prompt, 4)


def test_without_a_compare_model_both_answers_are_samples_of_the_served_model(tmp_path):
    db = tmp_path / "fb.sqlite"
    with client_for(db, temperature=1.0) as client:
        body = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "compare": True}).json()
    assert len(body["choices"]) == 2 and all("text" in c for c in body["choices"])
    assert {r["model"] for r in rows(db, "completions")} == {weights_sha256(tiny_lm()[0])}


def test_a_compare_request_that_cannot_get_both_answers_fails_whole_and_leaves_nothing_running(tmp_path):
    with client_for(tmp_path / "fb.sqlite", slow=0.01, max_concurrent=1, max_queue=0) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 24, "compare": True})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"  # the second sample has no slot
        engine = client.app.state.serve.engine
        deadline = time.monotonic() + 5
        while engine.stats().active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().active == 0 and engine.stats().tokens < 24  # the first was cancelled, not finished
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_stats_count_each_kind_and_give_each_models_win_rate_with_a_wilson_interval(tmp_path):
    db = tmp_path / "fb.sqlite"
    with client_for(db, compare_seed=1, api_key="k") as client:
        client.headers["authorization"] = "Bearer k"
        served, other = client.app.state.serve.sides
        winners = [served.model, served.model, other.model]  # the served model wins 2 of 3 decisive votes
        for winner in winners + ["tie", "both_bad"]:
            choices = client.post("/v1/chat/completions", json={**CHAT, "compare": True}).json()["choices"]
            ids = [c["id"] for c in choices]
            models = {i: client.app.state.serve.feedback.store.completion(i).model for i in ids}
            choice = winner if winner in ("tie", "both_bad") else "ab"[[models[i] for i in ids].index(winner)]
            vote(client, {"kind": "compare", "ids": ids, "choice": choice})
        vote(client, {"id": ids[0], "rating": "up"})
        stats = client.get("/v1/feedback/stats").json()
    compare = stats["kinds"]["compare"]
    assert (compare["total"], compare["a"] + compare["b"], compare["tie"], compare["both_bad"]) == (5, 3, 1, 1)
    assert stats["kinds"]["thumbs"] == {"total": 1, "up": 1, "down": 0} and stats["kinds"]["edit"] == {"total": 0}
    rate = stats["models"][served.model]["win_rate"]
    # 2 wins of n = 3, z = 1.96: p = 0.6667, z^2/n = 1.2805, centre (0.6667 + 0.6402) / 2.2805 = 0.5731,
    # half-width 1.96 * sqrt(0.6667 * 0.3333 / 3 + 3.8415 / 36) / 2.2805 = 1.96 * 0.42518 / 2.2805 = 0.3654
    assert (rate["wins"], rate["decisive"]) == (2, 3) and rate["rate"] == pytest.approx(2 / 3)
    assert rate["low"] == pytest.approx(0.2077, abs=1e-4) and rate["high"] == pytest.approx(0.9385, abs=1e-4)
    other_rate = stats["models"][other.model]["win_rate"]
    assert (other_rate["wins"], other_rate["decisive"]) == (1, 3)
    assert stats["models"][served.model]["name"] == "tiny" and stats["models"][other.model]["name"] == "other"
    assert stats["models"][served.model]["compare"] == 5


def test_the_weights_hash_names_the_weights():
    model, _ = tiny_lm()
    same, _ = tiny_lm()
    assert weights_sha256(model) == weights_sha256(same) and len(weights_sha256(model)) == 64
    with torch.no_grad():
        same.lm_head.weight[0, 0] += 1e-3
    assert weights_sha256(model) != weights_sha256(same)
    assert weights_sha256(model) != weights_sha256(tiny_lm(seed=1)[0])


def test_wilson_interval_by_hand():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # 8 of 10: p = 0.8, z^2/n = 0.38415, centre (0.8 + 0.19207) / 1.38415 = 0.71675,
    # half 1.96 * sqrt(0.016 + 0.0096037) / 1.38415 = 1.96 * 0.16001 / 1.38415 = 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 5)[0] == 0.0


# ---- export, read back by the data modules -----------------------------------------------------------------------
def filled_store(db) -> FeedbackStore:
    store = FeedbackStore(db)
    user = [{"role": "user", "content": "where is zorn?"}]
    chat = [{"role": "context", "content": "a note"}, *user]
    answers = {
        "t1": ("north", chat, [{"id": "d1", "text": "zorn is north", "score": 0.9}]),
        "t2": ("south", user, []),
        "c1": ("north, by the sea", user, []),
        "c2": ("no idea", user, []),
        "e1": ("it is far", user, []),
        "m1": ("yes", [*user, {"role": "assistant", "content": "north"}, {"role": "user", "content": "sure?"}], []),
        "r1": ("raw", None, []),
    }
    for cid, (text, messages, sources) in answers.items():
        store.remember(Completion(cid, "sha", "where is zorn?", messages, sources, text, {"temperature": 0.7}))
    store.vote(Thumbs("t1", "up"))
    store.vote(Thumbs("t2", "down"))
    store.vote(Compare(("c1", "c2"), "a"))
    store.vote(Compare(("c2", "t2"), "both_bad"))
    store.vote(Compare(("t1", "c1"), "tie"))
    store.vote(Edit("e1", "Zorn is in the north."))
    store.vote(Edit("m1", "Yes, north."))
    store.vote(Thumbs("r1", "up"))
    return store


def test_export_writes_what_data_preference_kto_and_sft_read(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    filled_store(db).close()
    prompt = render_prompt([Message("user", "where is zorn?")])
    # preference: compare a (c1 over c2), and the two edits (edit over the answer)
    assert cli_main(["feedback", "export", str(db), "--format", "preference", "--out", str(tmp_path / "p.jsonl")]) == 0
    assert "wrote" in capsys.readouterr().out
    pairs = list(PreferenceDataset.from_jsonl(tmp_path / "p.jsonl", on_invalid="error"))
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("north, by the sea", "no idea"), ("Zorn is in the north.", "it is far"), ("Yes, north.", "yes"),
    ]  # fmt: skip
    assert pairs[0].prompt == prompt
    multi = [Message("user", "where is zorn?"), Message("assistant", "north"), Message("user", "sure?")]
    assert pairs[2].prompt == render_prompt(multi)
    # kto: thumbs (t1 with its system note and source as context), compare a unpaired, both_bad twice, edits unpaired
    result = export_feedback(db, "kto", tmp_path / "k.jsonl")
    rows_ = read_unpaired_jsonl(tmp_path / "k.jsonl")
    assert [(r.completion, r.desirable) for r in rows_] == [
        ("north", True), ("south", False), ("north, by the sea", True), ("no idea", False), ("no idea", False),
        ("south", False), ("Zorn is in the north.", True), ("it is far", False), ("Yes, north.", True), ("yes", False),
    ]  # fmt: skip
    assert rows_[0].prompt == render_prompt([Message("user", "where is zorn?")], context="a note\nzorn is north")
    assert result.skipped == {"raw-text completion (not a chat turn)": 1, "compare tie": 1}
    # sft: the single-turn edit only
    result = export_feedback(db, "sft", tmp_path / "s.jsonl")
    data = SFTDataModule(path=str(tmp_path / "s.jsonl"))
    assert [(r["prompt"], r["response"]) for r in data._raw] == [("where is zorn?", "Zorn is in the north.")]
    assert result.skipped["edit of a multi-turn conversation (an SFT record holds one prompt)"] == 1
    with pytest.raises(SystemExit, match="already exists"):
        cli_main(["feedback", "export", str(db), "--format", "sft", "--out", str(tmp_path / "s.jsonl")])
    with pytest.raises(SystemExit, match="no such file"):
        cli_main(["feedback", "export", str(tmp_path / "none.sqlite"), "--format", "sft", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize(
    "stage, fmt, module, size",
    [
        ("dpo", "preference", "PreferenceDataModule", 3),
        ("kto", "kto", "UnpairedDataModule", 10),
        ("sft", "sft", "SFTDataModule", 1),
    ],
)
def test_data_feedback_reads_the_database_through_each_formats_data_module(tmp_path, stage, fmt, module, size):
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    db = tmp_path / "fb.sqlite"
    filled_store(db).close()
    cfg = compose_cfg(tmp_path, f"stage={stage}", "data=feedback", f"data.db={db}", f"data.format={fmt}")
    data = instantiate(cfg.data)
    assert type(data).__name__ == module
    held = {"preference": lambda: len(data.dataset), "kto": lambda: sum(map(len, data.examples.values()))}
    assert held.get(fmt, lambda: len(data._raw))() == size  # the export's records, every one valid


def test_data_feedback_names_the_database_it_cannot_use(tmp_path):
    from neuraflux.feedback.data import feedback_data_module

    with pytest.raises(ValueError, match="data.db: feedback database .*none.sqlite: no such file"):
        feedback_data_module(str(tmp_path / "none.sqlite"))
    FeedbackStore(tmp_path / "empty.sqlite").open().close()
    with pytest.raises(ValueError, match="empty.sqlite: no preference records in its feedback \\(skipped: no votes\\)"):
        feedback_data_module(str(tmp_path / "empty.sqlite"))
    with pytest.raises(ValueError, match="data.format must be one of"):
        feedback_data_module(str(tmp_path / "empty.sqlite"), format="dpo")


def test_a_vote_on_an_empty_answer_is_skipped_not_written_as_a_record_no_reader_takes(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite")
    user = [{"role": "user", "content": "hi"}]
    for cid, text in (("e", ""), ("f", "fine")):
        store.remember(Completion(cid, "sha", "hi", user, [], text, {}))
    store.vote(Thumbs("e", "down"))
    store.vote(Compare(("e", "f"), "b"))
    for fmt in ("preference", "kto"):
        result = export_feedback(tmp_path / "fb.sqlite", fmt, tmp_path / f"{fmt}.jsonl")
        assert result.records == [] and result.skipped == {"an empty answer": 2}


@pytest.mark.parametrize(("stage", "fmt"), [("dpo", "preference"), ("kto", "kto")])
def test_an_export_of_peoples_votes_trains_a_dpo_and_a_kto_stage(tmp_path, init_dir, stage, fmt):  # noqa: F811
    from neuraflux.train import train
    from tests.conftest import compose_cfg

    db = tmp_path / "votes.sqlite"
    store = FeedbackStore(db)
    for n in range(24):
        question, turns = f"Where does person {n} live?", [{"role": "user", "content": f"Where does person {n} live?"}]
        for side, text in (("a", f"Person {n} lives in town {n}."), ("b", "No idea, you fool.")):
            store.remember(Completion(f"{side}{n}", "sha", question, turns, [], text, {"temperature": 1.0}))
        store.vote(Compare((f"a{n}", f"b{n}"), "a"))
    store.close()
    out = tmp_path / f"{fmt}.jsonl"
    assert cli_main(["feedback", "export", str(db), "--format", fmt, "--out", str(out)]) == 0
    cfg = compose_cfg(tmp_path, f"stage={stage}", f"data={'preference' if fmt == 'preference' else 'kto'}",
                      f"data.path={out}", f"stage.init_from={init_dir}", "trainer.max_steps=6",
                      "trainer.val_check_interval=6", "optim.lr=1e-3", f"paths.run_dir={tmp_path / 'run'}")  # fmt: skip
    metrics, _ = train(cfg)
    assert metrics["global_step"] == 6
    # the policy starts as its reference: every implicit reward is 0, so is the margin between the people's chosen
    # (desirable) and rejected (undesirable) answers; six steps on their choices open it on the validation rows
    assert metrics["val/margins"] > 0.01
