"""Around every audit response: strict security headers, and its status and time counted."""

from __future__ import annotations

import time
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.runtime.audit.paths import endpoint_of

# Nothing but our own stylesheet and icon may load; forms post only to us; no framing.
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class AuditObserver(Protocol):
    """Where answered requests are counted (service.runtime.metrics.Metrics)."""

    def audit_answered(self, endpoint: str, code: int, seconds: float) -> None: ...


class AuditHeaders:
    """ASGI middleware: security headers on every response, `Cache-Control: no-store` unless
    the response chose its own (the stylesheet), and one observation per request."""

    def __init__(self, app: ASGIApp, observer: AuditObserver) -> None:
        self._app = app
        self._observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in HEADERS if k not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            self._observer.audit_answered(endpoint_of(scope["path"]), status, elapsed)
