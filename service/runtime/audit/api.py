"""GET /deliveries and GET /dead-letters (JSON, bearer token), their OpenAPI, and the app.

`audit_routes` gives AsgiFastStream the (path, app) pairs to serve beside /healthz,
/readyz and /metrics; none while NOTIFY_HTTP_TOKEN is unset, so the audit answers 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from service import __version__
from service.delivery.ledger import DeliveryQuery, Ledger, LedgerUnavailable, Status
from service.runtime.audit.auth import Token
from service.runtime.audit.context import AuditContext, DenialObserver, context, require_bearer
from service.runtime.audit.middleware import AuditHeaders, AuditObserver
from service.runtime.audit.page import router as page_router
from service.runtime.audit.paths import PATHS
from service.runtime.audit.query import (
    TEXT_MAX,
    TEXT_PATTERN,
    BadParameter,
    check_names,
    from_validation,
    parse_since,
    recipient_filter,
)
from service.runtime.audit.report import (
    LIMIT_DEFAULT,
    LIMIT_MAX,
    dead_letter_json,
    delivery_json,
)

DELIVERY_FILTERS = ("ticket", "activity", "recipient", "status", "since", "limit")
DEAD_LETTER_FILTERS = ("ticket",)


class DeliveryRow(BaseModel):
    """One notification's newest outcome."""

    ticket: str | None
    activity: str
    kind: str
    recipient: str
    """The address; for `unresolved`, the token nobody in the directory answers to."""
    status: Status
    at: str
    """When the ledger recorded this status: ISO 8601 UTC, e.g. 2026-11-27T09:15:02Z."""
    message_id: str | None
    reason: str | None


class Deliveries(BaseModel):
    deliveries: list[DeliveryRow]


class DeadLetterRow(BaseModel):
    """A Kafka record sent to the dead-letter topic."""

    ticket: str | None
    event: str | None
    stage: str
    reason: str | None
    at: str | None
    topic: str
    partition: int
    offset: int


class DeadLetters(BaseModel):
    dead_letters: list[DeadLetterRow]


class Problem(BaseModel):
    error: str
    parameter: str | None = None
    detail: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "A bad or unknown parameter, named in `parameter`."},
    401: {"model": Problem, "description": "No valid `Authorization: Bearer` token."},
    503: {"model": Problem, "description": "The ledger is unreachable; try again."},
}

Text = Annotated[
    str | None, Query(max_length=TEXT_MAX, pattern=TEXT_PATTERN, description="exact match")
]


def known(names: tuple[str, ...]) -> Callable[[Request], None]:
    """A dependency refusing parameters outside `names` (and repeated ones)."""

    def check(request: Request) -> None:
        check_names(request.query_params.multi_items(), names)

    return check


class AuditMetrics(AuditObserver, DenialObserver, Protocol):
    """Counts answered and refused requests (service.runtime.metrics.Metrics)."""


bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <NOTIFY_HTTP_TOKEN>`",
    scheme_name="token",
)


def create_audit_app(ledger: Ledger, token: str, metrics: AuditMetrics) -> ASGIApp:
    """The audit as one ASGI app (API, OpenAPI, page), security headers and metrics around it."""
    app = FastAPI(
        title="Ticket notifier: delivery audit",
        version=__version__,
        description=(
            "Every outcome of every notification, with its ticket (contract section 8). "
            "Every endpoint but this description needs `Authorization: Bearer "
            "<NOTIFY_HTTP_TOKEN>`; the page at /ui/ takes the token once and keeps a cookie."
        ),
        openapi_url="/openapi.json",
        # Swagger UI and ReDoc load scripts from a CDN: not on this CSP, not offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.audit = AuditContext(ledger, Token(token), metrics)
    guarded = [Security(bearer), Depends(require_bearer)]

    @app.get(
        "/deliveries",
        response_model=Deliveries,
        responses=ERRORS,
        dependencies=[*guarded, Depends(known(DELIVERY_FILTERS))],
        summary="Notifications and their outcomes, newest first",
    )
    async def deliveries(
        audit: Annotated[AuditContext, Depends(context)],
        ticket: Text = None,
        activity: Text = None,
        recipient: Annotated[
            str | None,
            Query(
                max_length=TEXT_MAX,
                pattern=TEXT_PATTERN,
                description="an address (any case) or, for `unresolved` rows, the token",
            ),
        ] = None,
        status: Annotated[Status | None, Query(description="one status")] = None,
        since: Annotated[
            str | None,
            Query(
                description="ISO 8601; without a zone, UTC",
                json_schema_extra={"format": "date-time"},
                examples=["2026-11-27T09:00:00Z"],
            ),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_DEFAULT,
    ) -> dict[str, Any]:
        query = DeliveryQuery(
            ticket=ticket,
            activity=activity,
            recipient=recipient_filter(recipient),
            status=status,
            since=parse_since(since),
            limit=limit,
        )
        rows = await audit.ledger.deliveries(query)
        return {"deliveries": [delivery_json(d) for d in rows]}

    @app.get(
        "/dead-letters",
        response_model=DeadLetters,
        responses=ERRORS,
        dependencies=[*guarded, Depends(known(DEAD_LETTER_FILTERS))],
        summary="A ticket's records sent to the dead-letter topic, newest first",
    )
    async def dead_letters(
        audit: Annotated[AuditContext, Depends(context)],
        ticket: Annotated[str, Query(max_length=TEXT_MAX, pattern=TEXT_PATTERN)],
    ) -> dict[str, Any]:
        letters = await audit.ledger.dead_letters_of(ticket)
        return {"dead_letters": [dead_letter_json(letter) for letter in letters]}

    app.include_router(page_router)
    add_error_handlers(app)
    return AuditHeaders(app, metrics)


def add_error_handlers(app: FastAPI) -> None:
    """400 naming the parameter, 401 without a hint, 503 while the ledger is away."""

    async def bad_parameter(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BadParameter)
        body = Problem(error="bad parameter", parameter=exc.parameter, detail=exc.problem)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=400)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return await bad_parameter(request, from_validation(exc.errors()))

    async def unreachable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            Problem(error="ledger unreachable").model_dump(exclude_none=True), status_code=503
        )

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            Problem(error=str(exc.detail)).model_dump(exclude_none=True),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    app.add_exception_handler(BadParameter, bad_parameter)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(LedgerUnavailable, unreachable)
    app.add_exception_handler(StarletteHTTPException, http_error)


def audit_routes(
    ledger: Ledger, token: str | None, metrics: AuditMetrics
) -> list[tuple[str, ASGIApp]]:
    """(path, app) for every path the audit answers; none when `token` is None (audit off)."""
    if token is None:
        return []
    app = create_audit_app(ledger, token, metrics)
    return [(path, app) for path in PATHS]
