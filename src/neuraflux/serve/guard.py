"""What the server refuses before any route runs, and the uvicorn settings that go with it.

* **Host** (DNS rebinding): a server bound to a loopback address answers only requests whose `Host` is a loopback
  name (`127.0.0.1`, `localhost`, `[::1]`, with or without a port); `serve.allowed_hosts` replaces that list
  (`["*"]` accepts any). Bound elsewhere, any `Host` is accepted unless the list is set.
* **Origin** (a web page's requests): a request that carries an `Origin` header (browsers send one on cross-origin
  requests and on every WebSocket) must come from the server's own origin, or one in `serve.allowed_origins`.
  Clients that are not browsers send none and are not affected.
* **Size**: a body over `serve.max_body_bytes` is refused (413 `request_too_large`) from its `Content-Length`
  before a byte of it is read, or as soon as a chunked body passes the limit; uvicorn closes a WebSocket whose
  message is larger (close code 1009), and the connection refuses one that arrives anyway.
* **Time** (slow-loris): request headers must arrive within `serve.read_timeout_s` of the connection opening (or of
  the previous response), and a body within `read_timeout_s` of its headers (408 `request_timeout`); a connection
  that trickles is closed.

The body is read here, whole (it is at most `max_body_bytes`), then handed on to the app.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from urllib.parse import urlsplit

from neuraflux.serve.config import ServeConfig
from neuraflux.serve.protocol import ServeError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
BODY_METHODS = ("POST", "PUT", "PATCH")


def host_name(value: str) -> str:
    """The host of a `Host` header or an origin's netloc without its port, lower case (`[::1]:8000` -> `[::1]`)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts_for(config: ServeConfig) -> frozenset[str] | None:
    """The `Host` names accepted, or None for any."""
    if config.allowed_hosts is not None:
        names = frozenset(host_name(h) for h in config.allowed_hosts)
        return None if "*" in names else names
    if config.host in LOOPBACK_HOSTS:
        return frozenset(LOOPBACK_NAMES)
    try:
        if ipaddress.ip_address(config.host).is_loopback:
            return frozenset((*LOOPBACK_NAMES, config.host))
    except ValueError:
        pass
    return None


class Guard:
    """ASGI middleware: Host, Origin, body size and read time, checked before the app sees a request."""

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.max_body = config.max_body_bytes
        self.read_timeout = config.read_timeout_s
        self.hosts = allowed_hosts_for(config)
        self.origins = frozenset(o.rstrip("/").lower() for o in config.allowed_origins or ())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.refusal(headers, scope)
        if refusal is not None:
            return await self.refuse(scope, receive, send, refusal)
        if scope["type"] == "websocket" or scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
            return await self.refuse(scope, receive, send, too_large(self.max_body))
        try:
            body = await self.read_body(receive)
        except ServeError as err:
            return await self.refuse(scope, receive, send, err)
        if body is None:  # the client went away before sending its body
            return None
        return await self.app(scope, replay(body, receive), send)

    def refusal(self, headers: dict[str, str], scope) -> ServeError | None:
        host = headers.get("host")
        if self.hosts is not None and (host is None or host_name(host) not in self.hosts):
            return ServeError(
                "forbidden",
                f"Host {str(host)[:80]!r} is not served here (serve.allowed_hosts; loopback names by default)",
            )
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host, scope):
            return ServeError(
                "forbidden",
                f"requests from the web origin {origin[:80]!r} are refused (serve.allowed_origins)",
            )
        return None

    def origin_allowed(self, origin: str, host: str | None, scope) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        parts = urlsplit(origin)
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        # the page this server serves (the chat page) talks to it from its own origin
        return host is not None and parts.scheme == scheme and parts.netloc == host.strip().lower()

    async def read_body(self, receive) -> bytes | None:
        """The whole body, or None when the client disconnected; ServeError past the size or the time limit."""
        deadline = time.monotonic() + self.read_timeout
        chunks, total = [], 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise ServeError(
                    "request_timeout", f"the request body did not arrive within {self.read_timeout:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                raise too_large(self.max_body)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def refuse(self, scope, receive, send, err: ServeError) -> None:
        if scope["type"] == "websocket":
            # before the handshake is accepted: the client sees the upgrade refused (HTTP 403)
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})
            return
        body = json.dumps(err.to_openai()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": err.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),  # whatever of the body is still coming is not read
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def too_large(limit: int) -> ServeError:
    return ServeError("request_too_large", f"the request body is over {limit} bytes (serve.max_body_bytes)")


def replay(body: bytes, receive):
    """A `receive` that gives the app the body already read, then the connection's own messages (a disconnect)."""
    sent = False

    async def receive_replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_replayed


def header_timeout_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived `read_timeout_s`
    after it opened (or after the previous response): uvicorn alone waits for them forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(read_timeout_s, self.header_timeout)

        def header_timeout(self) -> None:
            self.header_timer = None
            waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def uvicorn_config(app, config: ServeConfig, **overrides):
    """The uvicorn settings `neuraflux serve` runs with (and the tests that start a real server)."""
    import uvicorn

    settings = dict(
        host=config.host,
        port=config.port,
        log_level="info",
        http=header_timeout_protocol(config.read_timeout_s),
        ws_max_size=config.max_body_bytes,
        timeout_keep_alive=5,
    )
    return uvicorn.Config(app, **{**settings, **overrides})
