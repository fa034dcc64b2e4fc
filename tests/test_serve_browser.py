"""The chat page in a real headless Chromium: type a question, see streamed text appear, save a screenshot.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package (no `playwright install`:
the browser is the system one). Skips, saying which is missing, where neither can be installed.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server tests need the web stack: pip install -e '.[serve]'")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing: pip install playwright"
)

import uvicorn  # noqa: E402

from neuraflux.serve import create_app  # noqa: E402
from tests.test_serve import BASE  # noqa: E402
from tests.test_serve_engine import slow_down, tiny_lm  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_url():
    model, tok = tiny_lm()
    slow_down(model, 0.02)  # ~50 tokens/s: slow enough to see the answer grow
    port = free_port()
    app = create_app(dataclasses.replace(BASE, max_new_tokens=40), model, tok, model_name="tiny")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start within 10 s"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_page_streams_an_answer_in_chromium(server_url, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(server_url)
            page.wait_for_function("document.getElementById('status').textContent === 'connected'", timeout=10_000)
            # the retrieval box follows the server (this one has no store: unchecked, and it cannot be checked)
            page.wait_for_function("document.getElementById('retrieval').disabled === true", timeout=10_000)
            assert not page.is_checked("#retrieval")
            page.fill("#max-tokens", "40")
            page.fill("#input", "what is the tallest tower?")
            page.click("#send")
            answer = page.locator(".msg.assistant .text").first
            # streamed: some text is visible while the request is still running (stop still enabled)
            page.wait_for_function(
                "document.querySelector('.msg.assistant .text').textContent.length > 0", timeout=10_000
            )
            partial = answer.text_content()
            assert page.is_enabled("#stop"), "the answer finished before any streamed text was seen"
            page.wait_for_selector(".msg.assistant .meta", timeout=15_000)
            final = answer.text_content()
            assert page.locator(".msg.assistant .meta").text_content() == "length · 40 tokens"
            assert len(final) == 40 and final.startswith(partial) and len(partial) < 40
            assert page.locator(".msg.user").text_content() == "what is the tallest tower?"
            page.screenshot(path=str(ARTIFACTS / "serve_chat.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "serve_chat.png").stat().st_size > 0
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_page_sends_thumbs_edits_and_blind_comparisons(tmp_path):
    """With feedback on: a thumbs-up, an edit and a comparison from the page reach the feedback database."""
    import sqlite3

    model, tok = tiny_lm()
    db = tmp_path / "feedback.sqlite"
    port = free_port()
    config = dataclasses.replace(BASE, feedback_db=str(db))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, model, tok), host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(10_000)
                page.goto(f"http://127.0.0.1:{port}")
                page.wait_for_function("document.getElementById('status').textContent === 'connected'")
                page.fill("#max-tokens", "8")
                page.fill("#input", "hi")
                page.click("#send")
                page.click(".msg.assistant .rate-up")
                page.wait_for_selector(".msg.assistant .rate-up.voted", timeout=10_000)
                page.click(".msg.assistant .edit")
                page.fill(".msg.assistant .edit-text", "Hello there.")
                page.click(".msg.assistant .save-edit")
                page.wait_for_selector(".msg.assistant .save-edit.voted", timeout=10_000)
                page.check("#compare")
                page.fill("#input", "and now?")
                page.click("#send")
                page.click(".compare .choose-b")
                page.wait_for_selector(".compare .choose-b.voted", timeout=10_000)
                assert page.locator(".compare .msg.assistant").count() == 2
                assert page.locator(".msg.assistant .rate-up.voted").count() == 1  # the edit left the thumbs alone
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "serve_feedback.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    with sqlite3.connect(db) as conn:
        votes = conn.execute("SELECT kind, rating, choice, text FROM votes ORDER BY id").fetchall()
    assert votes == [("thumbs", "up", None, None), ("edit", None, None, "Hello there."), ("compare", None, "b", None)]
