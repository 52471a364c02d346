"""Connection guards on uvicorn's h11 protocol: slow clients, oversized request heads, too many connections.

uvicorn drops idle keep-alive connections, but a client that sends half a request head (or a body
byte now and then after the answer) is kept forever, a request line over h11's buffer limit is cut
off with a bare reset, and ``limit_concurrency`` answers in plain text. :class:`GuardedH11Protocol`
(passed to uvicorn as ``http=``) adds:

- a head timeout: from the moment the server waits for a request (connection opened, previous
  answer sent) the client has ``head_timeout`` seconds to send the whole head; otherwise 408
  ``head_timeout`` and the connection is closed. The same clock closes a connection whose client
  still dribbles a body the server has already answered;
- a size limit on the head (``max_head_bytes``): 414 ``uri_too_long`` when the request line alone
  is longer, 431 ``headers_too_large`` otherwise, answered in full: the server half-closes and
  reads (and drops) up to ``linger_bytes`` more so the client gets the answer, not a reset;
- a connection limit (``max_connections`` per worker): a connection over it is answered 503
  ``overloaded`` with ``Retry-After`` and closed.

Answers are the server's usual ``{"error": {"code", "message"}}``. Body read timeouts are the
app's (it answers 408 ``body_timeout``), see :mod:`catalens.serve.app`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass
class ConnectionLimits:
    """Per-process limits read by every :class:`GuardedH11Protocol` (set by :func:`configure`)."""

    head_timeout: float = 10.0
    max_head_bytes: int = 16 * 1024
    max_connections: int | None = 256
    linger_seconds: float = 2.0
    linger_bytes: int = 4 * 2**20


LIMITS = ConnectionLimits()
_REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            400: "Bad Request", 503: "Service Unavailable"}


def configure(**limits) -> ConnectionLimits:
    """Set this process's limits (``catalens serve`` calls it in every worker before serving)."""
    for k, v in limits.items():
        if not hasattr(LIMITS, k):
            raise TypeError(f"unknown connection limit {k!r}")
        setattr(LIMITS, k, v)
    return LIMITS


def error_bytes(status: int, code: str, message: str, extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 error answer with the server's JSON error body; ``Connection: close``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in extra_headers)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def overloaded_app(scope, receive, send) -> None:
    """ASGI app for a connection over the limit: 503 with Retry-After, then the connection closes."""
    body = json.dumps({"error": {"code": "overloaded", "message": (
        f"the server has too many open connections (more than {LIMITS.max_connections}, server option "
        f"--max-connections); retry in a moment")}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head timeout, a head size limit and a connection limit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMITS.max_head_bytes)
        self._head = bytearray()       # the first max_head_bytes + 1 bytes of the head being received
        self._head_timer = None
        self._linger_timer = None
        self._linger = False           # a refusal was sent: drop what still arrives, then close
        self._lingering = 0            # bytes dropped so far

    # ---------------------------------------------------------------- connection life
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if LIMITS.max_connections is not None and len(self.connections) > LIMITS.max_connections:
            self.app = overloaded_app
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger:
            self._lingering += len(data)
            if self._lingering > LIMITS.linger_bytes:
                self.transport.close()
            return
        if self.conn.their_state is h11.IDLE and len(self._head) <= LIMITS.max_head_bytes:
            self._head += data[: LIMITS.max_head_bytes + 1 - len(self._head)]
            if len(self._head) > LIMITS.max_head_bytes and b"\r\n\r\n" not in self._head:
                # h11 checks its limit on incomplete heads only: one read can bring a whole big head
                self.send_400_response("the request head is too long")
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._head_timer is not None and self._app_busy():
            self._head_timer.cancel()      # a whole head arrived: the app has the request now
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._head.clear()
            self._arm_head_timer()          # the next request's head, or the rest of an unread body

    # ---------------------------------------------------------------- refusals
    def send_400_response(self, msg: str) -> None:
        """h11 found the head malformed or over the size limit: say which, answer in full, linger."""
        head, limit = bytes(self._head), LIMITS.max_head_bytes
        if len(head) > limit and b"\r\n" not in head:
            status, code, text = 414, "uri_too_long", (f"the request line is longer than {limit:,} bytes; send "
                                                       f"parameters in the body, not the URL")
        elif len(head) > limit:
            status, code, text = 431, "headers_too_large", f"the request head is longer than {limit:,} bytes"
        else:
            status, code, text = 400, "bad_http", f"not a valid HTTP/1.1 request ({msg.rstrip('.')})"
        self.logger.warning("refused a request: %s %s", status, code)
        self._refuse(error_bytes(status, code, text))

    def _refuse(self, answer: bytes) -> None:
        self.transport.write(answer)
        self._linger = True
        if self.transport.can_write_eof():
            self.transport.write_eof()       # the client reads the answer, then closes its end
        self._linger_timer = self.loop.call_later(LIMITS.linger_seconds, self.transport.close)

    def _app_busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(LIMITS.head_timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._linger:
            return
        if self._app_busy():
            return                              # the app is working on a request: its own timeouts apply
        if self.conn.their_state is h11.IDLE and self._head:
            self.logger.warning("closed a connection: no complete request head in %g s", LIMITS.head_timeout)
            self.transport.write(error_bytes(408, "head_timeout", (
                f"the request head did not arrive within {LIMITS.head_timeout:g} s (server option "
                f"--head-timeout)")))
        self.transport.close()

    def _cancel_timers(self) -> None:
        for t in (self._head_timer, self._linger_timer):
            if t is not None:
                t.cancel()
        self._head_timer = self._linger_timer = None
