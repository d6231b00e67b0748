"""What stands between the network and the routes: the request-body limit, the API key, a deadline for request
heads on every connection, the open-file limit, and a bounded log when the process runs out of descriptors."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import resource
import time

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


async def send_error(send, status_code: int, message: str, type: str, code: str) -> None:
    """An OpenAI-shaped JSON error, sent straight on the ASGI channel (before any route runs)."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status_code == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body reading lets it through to the app's error handlers."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes (the server's "
                              "--max-request-body-bytes)")


# A refused body is still read (and dropped) up to this size, so that a client that is still sending gets the 413
# instead of a reset connection; beyond it the connection is closed.
DRAIN_LIMIT_BYTES = 64 << 20


class BodySizeLimit:
    """HTTP 413 for a body over `max_bytes`: at once from Content-Length, else as soon as the chunks received pass
    it, so a huge body is never kept, parsed or tokenized. (Starlette's own limit answers before the client has
    sent its body, and a client still sending sees a reset connection instead of the 413.)"""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _drain(receive)
            error = BodyTooLarge(self.max_bytes)
            return await send_error(send, 413, error.detail, "invalid_request_error", "request_too_large")
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


async def _drain(receive) -> None:
    drained = 0
    while drained < DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


# What an API key leaves open: the probes and the docs compute nothing for a client. Every other path (/v1,
# /tokenize, /detokenize, and any route added later) needs the key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class APIKeyCheck:
    """OpenAI's 401 for a protected path without `Authorization: Bearer <api key>` (compared in constant time)."""

    def __init__(self, app, api_key: str, protect_health_and_metrics: bool) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = OPEN_PATHS - ({"/health", "/metrics"} if protect_health_and_metrics else set())

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"  # CORS preflights carry no credentials
                and scope["path"] not in self.open_paths
                and not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected)):
            return await send_error(send, 401, "Incorrect or missing API key: send it as 'Authorization: Bearer "
                                    "<key>'", "invalid_request_error", "invalid_api_key")
        await self.app(scope, receive, send)


class HeadDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, but a connection must send a whole request head within `header_read_timeout`
    seconds of opening (or of its previous response): idle or trickling connections cannot pile up until the
    process runs out of file descriptors."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._cycle_at_arm:  # a request head arrived
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._cycle_at_arm = self.cycle
        self._head_deadline = self.loop.call_later(self.config.header_read_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        deadline = getattr(self, "_head_deadline", None)
        if deadline is not None:
            deadline.cancel()
        self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one (as vLLM does): every connection and stream holds a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d: %s", soft, exc)


class BoundedLoopErrorLog:
    """The event loop's exception handler, at most one line per kind of error every `interval_s` (with a count of
    those left out): a process out of descriptors fails every accept, and must not fill the disk with it."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        kind = f"{context.get('message', '')}: {type(exc).__name__}: {exc}" if exc else context.get("message", "")
        now = time.monotonic()
        if now - self._last_logged.get(kind, -self.interval_s) < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_logged[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        logger.error("event loop: %s%s", kind, f" ({suppressed} more like it not logged)" if suppressed else "")
