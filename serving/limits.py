"""Admission control in front of the model server's HTTP app: what a request may cost.

KServe's REST server (FastAPI on uvicorn) reads a request body of any size, at any pace, and
queues any number of requests. :class:`AdmissionMiddleware` bounds all of it before KServe sees
a byte, so overload ends in a fast, explicit answer instead of an OOM kill:

* a body over ``max_payload_bytes`` gets ``413`` (declared or while reading);
* a body that does not arrive within ``body_timeout_s`` gets ``408``;
* a request whose body would pass ``max_inflight_bytes`` of bodies held at once, or that
  arrives (body complete) while ``max_inflight_requests`` requests are being served, gets
  ``429`` with ``Retry-After``: the excess is shed, not queued, so admitted requests keep
  their latency; a slow upload holds bytes, never a serving slot.

Refused bodies are read and discarded (up to :data:`DRAIN_FACTOR` times the payload limit)
before the answer, so the client sees the answer, not a connection reset. Requests without a
body (health probes, metadata, ``/metrics``) are never limited: liveness holds under load.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PAYLOAD_FLAG = "--max_payload_bytes"
DRAIN_FACTOR = 2  # refused bodies up to this many times the payload limit are read, not reset
BODY_METHODS = {"POST", "PUT", "PATCH"}


@dataclass(frozen=True)
class AdmissionLimits:
    """What requests may cost at once (each a server flag)."""

    max_payload_bytes: int
    max_inflight_requests: int
    max_inflight_bytes: int
    body_timeout_s: float = 30.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_inflight_requests", "max_inflight_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be positive, got {self.body_timeout_s}")


async def respond(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A JSON error in KServe's shape, ``{"error": "..."}``."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    """The request header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that returns the whole ``body`` first, then defers to the real one."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


class _Refused(Exception):  # noqa: N818 - a verdict carried out of the body reader
    """A refusal. ``drain``: read the rest of the body before answering (there is some, and it
    is small enough); ``close``: answer with ``Connection: close`` (the body is left unread)."""

    def __init__(self, status: int, message: str, *, drain: bool = True, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.drain, self.close = status, message, drain, close


class _Ticket:
    """One request's share of the in-flight counts (its body's bytes from the start, a serving
    slot once :meth:`serving`), given back by :meth:`release`."""

    def __init__(self, gate: AdmissionMiddleware, declared: int) -> None:
        self.gate, self.bytes, self.slot = gate, declared, False
        gate.inflight_bytes += declared

    def grow_to(self, size: int) -> None:
        if size > self.bytes:
            self.gate.inflight_bytes += size - self.bytes
            self.bytes = size

    def serving(self) -> None:
        self.slot = True
        self.gate.inflight_requests += 1

    def release(self) -> None:
        self.gate.inflight_requests -= int(self.slot)
        self.gate.inflight_bytes -= self.bytes


class AdmissionMiddleware:
    """Pure ASGI middleware enforcing :class:`AdmissionLimits` (see the module doc).
    ``on_reject(reason)`` (optional) is called once per refused request, e.g. to count it."""

    def __init__(
        self,
        app: ASGIApp,
        limits: AdmissionLimits,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app, self.limits, self.on_reject = app, limits, on_reject
        self.inflight_requests = 0
        self.inflight_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.limits.body_timeout_s
        try:
            declared = self._declared_length(scope)
            self._admit_bytes(declared or 0)
            ticket = _Ticket(self, declared or 0)
            try:
                body = await self._read_body(receive, deadline, ticket)
                if body is None:  # the client went away: nobody to answer
                    return
                # the body is here: only now does the request take one of the serving slots,
                # so slow uploads cannot hold them (their bytes count against the byte budget)
                self._admit_request()
                ticket.serving()
                await self.app(scope, replay(body, receive), send)
            finally:
                ticket.release()
        except _Refused as refused:
            drained = not refused.drain or await self._drain(receive, deadline)
            await self._refuse(send, refused, close=refused.close or not drained)

    def _declared_length(self, scope: Scope) -> int | None:
        text = header(scope, b"content-length")
        if text is None:
            return None
        if not text.strip().isdigit():
            raise _Refused(
                400, f"Content-Length {text!r} is not a byte count", drain=False, close=True
            )
        declared = int(text)
        if declared > self.limits.max_payload_bytes:
            drain = declared <= DRAIN_FACTOR * self.limits.max_payload_bytes
            raise _Refused(
                413,
                self._too_large(f"the request body is {declared} bytes"),
                drain=drain,
                close=not drain,
            )
        return declared

    def _admit_bytes(self, declared: int, mine: int = 0) -> None:
        """Refuse ``declared`` more bytes beyond the budget (one request alone always fits)."""
        limits = self.limits
        others = self.inflight_bytes - mine
        if others and self.inflight_bytes + declared > limits.max_inflight_bytes:
            raise _Refused(
                429,
                f"the server is busy: {self.inflight_bytes} bytes of requests in flight, this "
                f"one would pass the limit of {limits.max_inflight_bytes} "
                f"(--max_inflight_bytes); retry after {limits.retry_after_s} s",
            )

    def _admit_request(self) -> None:
        limits = self.limits
        if self.inflight_requests >= limits.max_inflight_requests:
            raise _Refused(
                429,
                f"the server is busy: {self.inflight_requests} requests being served, the "
                f"limit is {limits.max_inflight_requests} (--max_inflight_requests); retry "
                f"after {limits.retry_after_s} s",
                drain=False,  # its body has been read whole
            )

    async def _read_body(self, receive: Receive, deadline: float, ticket: _Ticket) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await self._receive_by(receive, deadline)
            if message["type"] != "http.request":
                return None
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > self.limits.max_payload_bytes:
                raise _Refused(  # when this was the last chunk there is nothing left to drain
                    413,
                    self._too_large(
                        f"the request body exceeds {self.limits.max_payload_bytes} bytes"
                    ),
                    drain=more,
                )
            if size > ticket.bytes:  # a chunked body is accounted for as it arrives
                self._admit_bytes(size - ticket.bytes, mine=ticket.bytes)
                ticket.grow_to(size)
            chunks.append(chunk)
            if not more:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _receive_by(self, receive: Receive, deadline: float) -> Message:
        try:
            return await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise _Refused(
                408,
                f"the request body did not arrive within {self.limits.body_timeout_s:g} s; "
                "send it in one go",
                drain=False,
                close=True,
            ) from None

    async def _drain(self, receive: Receive, deadline: float) -> bool:
        """Read and drop the rest of a refused body (bounded), so the client sees the answer;
        whether it was read to its end (False: the connection must close)."""
        cap, size = DRAIN_FACTOR * self.limits.max_payload_bytes, 0
        try:
            while size <= cap:
                message = await self._receive_by(receive, deadline)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return True
                size += len(message.get("body", b""))
        except _Refused:
            pass
        return False

    async def _refuse(self, send: Send, refused: _Refused, *, close: bool) -> None:
        if self.on_reject is not None:
            self.on_reject(_REASONS.get(refused.status, str(refused.status)))
        headers = [(b"connection", b"close")] if close else []
        if refused.status == 429:
            headers.append((b"retry-after", str(self.limits.retry_after_s).encode()))
        await respond(send, refused.status, refused.message, headers)

    def _too_large(self, what: str) -> str:
        return (
            f"{what}, more than the server's limit of {self.limits.max_payload_bytes} bytes "
            f"({PAYLOAD_FLAG}); send fewer or smaller images per request"
        )


_REASONS = {
    400: "bad_content_length",
    408: "body_timeout",
    413: "payload_too_large",
    429: "overloaded",
}
