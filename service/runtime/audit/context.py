"""What every audit request needs (ledger, token, metrics), and the token checks on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fastapi import HTTPException, Request

from service.delivery.ledger import Ledger
from service.runtime.audit.auth import Token
from service.runtime.audit.paths import endpoint_of

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="notifier audit"'}


class DenialObserver(Protocol):
    """Where refused requests are counted (service.runtime.metrics.Metrics)."""

    def audit_refused(self, endpoint: str, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class AuditContext:
    """The audit's parts, built once at start-up and kept on the app's state."""

    ledger: Ledger
    token: Token
    observer: DenialObserver

    def refuse(self, request: Request, reason: str) -> None:
        """Count one request without a valid token (`reason`: missing or wrong)."""
        self.observer.audit_refused(endpoint_of(request.url.path), reason)


def context(request: Request) -> AuditContext:
    """The AuditContext of the app serving `request` (a FastAPI dependency)."""
    found: AuditContext = request.app.state.audit
    return found


def require_bearer(request: Request) -> None:
    """401 unless `Authorization: Bearer <NOTIFY_HTTP_TOKEN>`; the answer is the same for a
    missing header, another scheme and a wrong token, so it tells a guesser nothing."""
    audit = context(request)
    header = request.headers.get("authorization")
    scheme, _, presented = (header or "").strip().partition(" ")
    # Always one comparison, also when the header is missing or malformed: the time an
    # answer takes does not tell which of those it was.
    valid = audit.token.matches(presented.strip() if scheme.lower() == "bearer" else "")
    if valid and scheme.lower() == "bearer":
        return
    audit.refuse(request, "missing" if header is None else "wrong")
    raise HTTPException(401, "unauthorized", headers=UNAUTHORIZED_HEADERS)
