"""A hostile client against a real server (`neuraflux serve` in a subprocess, uvicorn, a tiny model): what it sends
is refused cheaply, and the server keeps answering everyone else. Then a bounded fuzz of the HTTP and WebSocket
APIs: no input gives a 500 or stops the server."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server tests need the web stack")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_serve import make_client  # noqa: E402
from tests.test_serve_engine import tiny_lm  # noqa: E402

MB = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (or its peak, VmHWM) in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`neuraflux serve` on a free port: (port, pid). Short read timeout so slow clients are seen quickly."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads process memory from /proc (Linux)")
    model_dir = tmp_path_factory.mktemp("model")
    model, tok = tiny_lm()
    model.save_pretrained(model_dir)
    tok.save(model_dir)
    port = free_port()
    cmd = [
        sys.executable, "-m", "neuraflux.cli", "serve", "--model", str(model_dir), "--port", str(port),
        "read_timeout_s=0.5", "max_prompt_tokens=60", "max_new_tokens=8", "default_max_new_tokens=4", "threads=1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if get(port, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError("the server did not start: " + proc.stderr.read().decode()[-2000:])
    yield port, proc.pid
    proc.terminate()
    proc.wait(10)


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class HealthProbe(threading.Thread):
    """Times GET /health every 20 ms until stopped: the slowest answer is what any client waited."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.latencies, self.stop = port, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            status, _ = get(self.port, "/health")
            assert status == 200
            self.latencies.append(time.perf_counter() - start)
            time.sleep(0.02)


def send_huge_body(port: int, size: int, chunked: bool) -> tuple[int, dict]:
    """POST `size` bytes of a JSON chat request; returns (status, error body). Stops sending once answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n"
    sock.sendall(head.encode())
    piece = b'{"messages": [{"role": "user", "content": "' + b"a" * (MB - 64)
    sent = 0
    sock.settimeout(0.001)
    answer = b""
    try:
        while sent < size:
            chunk = piece if sent + len(piece) <= size else piece[: size - sent]
            data = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
            try:
                sock.sendall(data)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            try:
                answer += sock.recv(65536)
                if b"\r\n\r\n" in answer:
                    break
            except (TimeoutError, BlockingIOError):
                pass
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50_mb_body_is_refused_while_health_answers_and_memory_stays_flat(server, chunked):
    port, pid = server
    idle = rss_mb(pid)
    probe = HealthProbe(port)
    probe.start()
    time.sleep(0.2)
    status, body = send_huge_body(port, 50 * MB, chunked)
    time.sleep(0.2)
    probe.stop.set()
    probe.join()
    peak = rss_mb(pid, "VmHWM") - idle
    # the figures docs/SERVING.md quotes: python -m pytest -s tests/test_hostile.py -k 50_mb
    slowest = 1000 * max(probe.latencies)
    sent = "chunked" if chunked else "Content-Length"
    print(f"\n50 MB body ({sent}): {status}, /health slowest of {len(probe.latencies)} polls {slowest:.1f} ms, "
          f"peak memory +{peak:.0f} MB over idle")  # fmt: skip
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert max(probe.latencies) < 0.1, max(probe.latencies)
    assert peak < 200, (idle, rss_mb(pid, "VmHWM"))
    assert get(port, "/health")[0] == 200


@pytest.mark.slow
def test_a_long_prompt_is_refused_by_its_length_without_stalling_others(server):
    port, _ = server
    probe = HealthProbe(port)
    probe.start()
    body = json.dumps({"messages": [{"role": "user", "content": "a" * 900_000}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    error = json.loads(r.read())["error"]
    probe.stop.set()
    probe.join()
    assert r.status == 400 and error["code"] == "prompt_too_long" and "it was not tokenized" in error["message"]
    assert max(probe.latencies) < 0.1, max(probe.latencies)


def test_slow_headers_and_slow_bodies_are_cut_off(server):
    port, _ = server
    # headers trickled a byte at a time: the connection is closed read_timeout_s (0.5 s) after it opened
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    start, closed = time.monotonic(), False
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
        try:
            sock.send(bytes([byte]))
            time.sleep(0.05)
        except OSError:
            closed = True
            break
        sock.settimeout(0.001)
        try:
            if sock.recv(1) == b"":
                closed = True
                break
        except (TimeoutError, BlockingIOError):
            pass
    sock.close()
    assert closed and time.monotonic() - start < 1.5
    # a body that stops arriving: 408 after read_timeout_s
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt": '
    )
    start = time.monotonic()
    answer = b""
    while chunk := sock.recv(65536):  # the head and the body come in separate writes; the server closes after both
        answer += chunk
    elapsed = time.monotonic() - start
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert elapsed < 1.5
    assert get(port, "/health")[0] == 200


def test_foreign_hosts_and_web_origins_are_refused(server):
    port, _ = server
    status, body = get(port, "/v1/models", {"Host": "evil.example"})  # DNS rebinding: a name that is not ours
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
    assert get(port, "/health", {"Host": f"localhost:{port}"})[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(
        "POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 1}),
        headers={"Content-Type": "application/json", "Origin": "http://evil.example"},
    )  # fmt: skip
    r = conn.getresponse()
    assert r.status == 403 and "evil.example" in json.loads(r.read())["error"]["message"]
    # the chat page's own origin may call it
    conn.request(
        "POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 1}),
        headers={"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"},
    )  # fmt: skip
    assert conn.getresponse().status == 200


def ws_handshake(port: int, origin: str | None) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    lines = [
        "GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    ]  # fmt: skip
    if origin:
        lines.append(f"Origin: {origin}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = sock.recv(4096)
    sock.close()
    return answer


def test_a_websocket_from_a_foreign_origin_is_refused_at_the_handshake(server):
    port, _ = server
    assert ws_handshake(port, "http://evil.example").startswith(b"HTTP/1.1 403")
    assert ws_handshake(port, f"http://127.0.0.1:{port}").startswith(b"HTTP/1.1 101")
    assert ws_handshake(port, None).startswith(b"HTTP/1.1 101")  # not a browser


@pytest.mark.slow
def test_an_oversize_websocket_message_closes_only_its_connection(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    port, _ = server
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
        start = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(json.dumps({"type": "generate", "id": 1, "prompt": "a" * (4 * MB)}))
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
        assert time.monotonic() - start < 2
    with connect(f"ws://127.0.0.1:{port}/ws") as ws:  # everyone else is still served
        ws.send(json.dumps({"type": "generate", "id": 2, "prompt": "hi", "max_new_tokens": 2}))
        while (msg := json.loads(ws.recv(timeout=10)))["type"] != "done":
            assert msg["type"] == "token"


# ---- fuzz: random JSON against the in-process app -------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
ROLES = st.sampled_from(["user", "assistant", "system", "context", "tool", "", None, 3])
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": JSON | st.text(max_size=60)})
CHAT = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(MESSAGE, max_size=4) | JSON,
        "max_tokens": st.integers(-3, 40) | JSON,
        "temperature": st.floats(allow_nan=True) | JSON,
        "top_p": st.floats() | JSON,
        "top_k": st.integers(-2, 100) | JSON,
        "stream": st.booleans() | JSON,
        "model": st.sampled_from(["tiny", "gpt"]) | JSON,
        "use_retrieval": st.booleans(),
        "n": JSON,
    },
)
WS_MESSAGE = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "cancel", "x"]) | JSON},
    optional={
        "id": st.integers(0, 3) | st.text(max_size=3) | JSON,
        "prompt": st.text(max_size=60) | JSON,
        "messages": st.lists(MESSAGE, max_size=3) | JSON,
        "max_new_tokens": st.integers(-2, 30) | JSON,
        "temperature": st.floats() | JSON,
        "extra": JSON,
    },
)
# derandomized: the same 150 cases every run, so CI is reproducible; NEURAFLUX_FUZZ_EXAMPLES=2000 searches wider
# (and at random)
FUZZ_EXAMPLES = int(os.environ.get("NEURAFLUX_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize="NEURAFLUX_FUZZ_EXAMPLES" not in os.environ,
)


@pytest.fixture(scope="module")
def client():
    with make_client() as c:
        yield c


@FUZZ
@given(body=CHAT | JSON, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzzed_http_bodies_never_give_a_500(client, body, path):
    if path == "/v1/completions" and isinstance(body, dict) and "messages" in body:
        body["prompt"] = body.pop("messages")
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500 or r.status_code in (503, 504), (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/health").status_code == 200


@FUZZ
@given(messages=st.lists(WS_MESSAGE | JSON, min_size=1, max_size=4))
def test_fuzzed_websocket_messages_never_end_the_connection(client, messages):
    with client.websocket_connect("/ws") as ws:
        for msg in messages:
            ws.send_text(json.dumps(msg))
        # the connection still answers: a cancel of an unknown id is a not_found error on the same socket
        ws.send_json({"type": "cancel", "id": "probe"})
        while True:
            reply = ws.receive_json()
            assert reply["type"] in ("token", "done", "error", "sources"), reply
            assert reply.get("code") != "internal", reply
            if reply.get("id") == "probe":
                assert reply["code"] == "not_found"
                break
