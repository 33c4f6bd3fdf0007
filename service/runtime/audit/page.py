"""The /ui/ page: sign in with the token once, find a ticket, see its notifications.

Server-rendered with Jinja (autoescape on: every value from the ledger is text, never
markup), no JavaScript, nothing loaded from elsewhere, so it works offline under the
strict Content-Security-Policy the middleware sets.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from service.delivery.ledger import LedgerUnavailable
from service.runtime.audit.auth import COOKIE, COOKIE_MAX_AGE, COOKIE_PATH
from service.runtime.audit.context import AuditContext, context
from service.runtime.audit.query import TEXT_MAX
from service.runtime.audit.report import (
    TicketReport,
    dead_letter_json,
    delivery_json,
    find_tickets,
)

HERE = Path(__file__).resolve().parent
FORM_MAX_BYTES = 4096
"""The login form holds one token: anything larger is refused unread."""

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
STATIC = {
    "audit.css": ((HERE / "static" / "audit.css").read_bytes(), "text/css; charset=utf-8"),
    "favicon.svg": ((HERE / "static" / "favicon.svg").read_bytes(), "image/svg+xml"),
}

router = APIRouter(include_in_schema=False)


def render(name: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = templates.get_template(name).render(**values)
    return HTMLResponse(html, status_code=status)


def signed_in(request: Request, audit: AuditContext) -> bool:
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and audit.token.cookie_matches(cookie)


def cross_site(request: Request) -> bool:
    """A form posted from another site (the browser says so in Sec-Fetch-Site)."""
    return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")


def forget_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE,
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


@router.get("/ui")
async def ui_without_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/", response_class=HTMLResponse)
async def page(request: Request, audit: Annotated[AuditContext, Depends(context)]) -> Response:
    if not signed_in(request, audit):
        if COOKIE not in request.cookies:
            return render("login.html", signed_in=False, error=None)
        # A cookie from an old token (or a forged one): counted, forgotten, asked again.
        audit.refuse(request, "wrong")
        response = render(
            "login.html", 401, signed_in=False, error="Your session ended. Sign in again."
        )
        forget_cookie(response, request)
        return response
    q = request.query_params.get("q", "").strip()
    if len(q) > TEXT_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in q):
        return render(
            "search.html",
            400,
            signed_in=True,
            q="",
            tickets=[],
            error=f"q: at most {TEXT_MAX} characters, no control characters",
        )
    try:
        tickets = await find_tickets(audit.ledger, q) if q else []
    except LedgerUnavailable:
        return render(
            "search.html",
            503,
            signed_in=True,
            q=q,
            tickets=[],
            error="The ledger cannot be reached right now. Try again in a moment.",
        )
    return render(
        "search.html", signed_in=True, q=q, tickets=[ticket_view(t) for t in tickets], error=None
    )


@router.post("/ui/login")
async def login(request: Request, audit: Annotated[AuditContext, Depends(context)]) -> Response:
    if cross_site(request):
        return Response("cross-site form refused\n", status_code=403)
    form = await read_form(request)
    if form is None:
        return Response("form too large\n", status_code=413)
    presented = form.get("token", [""])[0].strip()
    if not presented or not audit.token.matches(presented):
        audit.refuse(request, "missing" if not presented else "wrong")
        return render("login.html", 401, signed_in=False, error="That token is not valid.")
    response = RedirectResponse("/ui/", status_code=303)
    response.set_cookie(
        COOKIE,
        audit.token.cookie_value(),
        max_age=COOKIE_MAX_AGE,
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    if cross_site(request):
        return Response("cross-site form refused\n", status_code=403)
    response = RedirectResponse("/ui/", status_code=303)
    forget_cookie(response, request)
    return response


@router.get("/ui/static/{name}")
async def static(name: str) -> Response:
    found = STATIC.get(name)
    if found is None:
        return Response("not found\n", status_code=404)
    body, media_type = found
    return Response(body, media_type=media_type, headers={"Cache-Control": "max-age=3600"})


async def read_form(request: Request) -> dict[str, list[str]] | None:
    """The url-encoded form of a POST, or None when it is larger than FORM_MAX_BYTES."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_MAX_BYTES:
            return None
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def ticket_view(ticket: TicketReport) -> dict[str, Any]:
    """What the template shows of one ticket: rows as the API has them, plus display times."""
    deliveries = [delivery_json(d) for d in ticket.deliveries]
    letters = [dead_letter_json(letter) for letter in ticket.dead_letters]
    for row in (*deliveries, *letters):
        row["when"] = row["at"].replace("T", " ").replace("Z", " UTC") if row["at"] else ""
    counts = Counter(row["status"] for row in deliveries)
    summary = [f"{n} {status}" for status, n in counts.most_common()]
    if letters:
        summary.append(f"{len(letters)} dead letter{'s' if len(letters) > 1 else ''}")
    return {
        "ticket_id": ticket.ticket_id,
        "reference": ticket.reference,
        "deliveries": deliveries,
        "dead_letters": letters,
        "summary": summary,
        "truncated": ticket.truncated,
    }
