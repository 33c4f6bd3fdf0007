"""HTTP client of the helpdesk backend's read API: activity listings and ticket lookups."""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import SecretStr, ValidationError

from service.core.events import Ticket
from service.producer.cursor import pageable

log = logging.getLogger("service.producer.backend")

ACTIVITIES_PATH = "/backend/api/v1/ticketActivities/"
TICKET_PATH = "/backend/api/v1/tickets/{ticket_id}"
# Keys under which a backend might wrap a listing instead of returning a bare JSON array.
_WRAPPERS = ("items", "data", "results", "ticketActivities", "value")

Filter = Literal["createdSince", "updatedSince"]


class BackendError(Exception):
    """The backend did not answer usefully (transport error, timeout, 5xx, bad JSON): retry."""


class TicketsUnsupported(Exception):
    """The backend offers no ticket lookup (405/501, or 404 before any ticket was found)."""


@dataclass(frozen=True, slots=True)
class Listing:
    """One list response: the records, and the backend's clock (HTTP Date) if it sent one."""

    records: list[Mapping[str, Any]]
    server_time: dt.datetime | None


def format_since(moment: dt.datetime) -> str:
    """An ISO 8601 UTC timestamp floored to the second (flooring only widens the window)."""
    utc = moment.astimezone(dt.UTC).replace(microsecond=0, tzinfo=None)
    return utc.isoformat() + "Z"


def date_of(response: httpx.Response) -> dt.datetime | None:
    """The response's Date header (RFC 9110, second resolution) as an aware datetime."""
    header = response.headers.get("date")
    if not header:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def records_of(body: Any) -> list[Mapping[str, Any]]:
    """The activity records of a listing body: a JSON array, or one wrapped under a known key."""
    if isinstance(body, Mapping):
        for key in _WRAPPERS:
            if isinstance(body.get(key), list):
                body = body[key]
                break
    if not isinstance(body, list):
        raise BackendError("listing is not a JSON array")
    # Entries that are not objects hold nothing to publish and no id to page past.
    return [record for record in body if isinstance(record, Mapping)]


class BackendClient:
    """The backend's read API over one httpx.AsyncClient; use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        auth_header: str = "Authorization",
        auth_value: SecretStr | None = None,
        timeout_seconds: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json"}
        if auth_value is not None:
            headers[auth_header] = auth_value.get_secret_value()
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout_seconds,
            transport=transport,
            follow_redirects=False,
        )
        self._tickets_found = False

    async def __aenter__(self) -> BackendClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def list_activities(
        self, by: Filter, since: dt.datetime, after_id: int | None
    ) -> Listing:
        """GET the activities created/updated since `since`, with ids above `after_id`."""
        params: dict[str, str] = {by: format_since(since)}
        if after_id is not None:
            params["idAfter"] = str(after_id)
        response = await self._get(ACTIVITIES_PATH, params)
        if response.status_code != 200:
            raise BackendError(f"listing: HTTP {response.status_code}")
        return Listing(records_of(_json(response)), date_of(response))

    async def server_time(self) -> dt.datetime | None:
        """The backend's clock, from a listing that is empty by construction (no Date: None)."""
        tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        return (await self.list_activities("createdSince", tomorrow, None)).server_time

    async def created_among(self, since: dt.datetime, numbers: Collection[int]) -> set[int]:
        """Which of these activity ids `createdSince=since` lists (paged from the lowest)."""
        found: set[int] = set()
        after, last = min(numbers) - 1, max(numbers)
        while after < last:
            listing = await self.list_activities("createdSince", since, after)
            listed = [n for n, _ in pageable(listing.records, after)[0]]
            if not listed:
                break
            found.update(n for n in listed if n in numbers)
            after = listed[-1]
        return found

    async def ticket(self, ticket_id: str) -> Ticket | None:
        """The ticket with its customer, or None when the backend has no usable one."""
        if ticket_id in {".", ".."}:
            return None
        response = await self._get(TICKET_PATH.format(ticket_id=_segment(ticket_id)), None)
        status = response.status_code
        if status in (405, 501) or (status == 404 and not self._tickets_found):
            raise TicketsUnsupported(f"ticket lookup: HTTP {status}")
        if status == 404:
            return None
        if status != 200:
            raise BackendError(f"ticket lookup: HTTP {status}")
        body = _json(response)
        self._tickets_found = True
        if not isinstance(body, Mapping):
            return None
        try:
            ticket = Ticket.model_validate({**body, "id": body.get("id", ticket_id)})
        except ValidationError:
            log.warning("ticket not usable", extra={"ticket_id": ticket_id})
            return None
        # Without a customer the consumer would trust data.ticket and mail no customer;
        # leaving the ticket out makes it look the ticket up in its directory instead.
        if ticket.id != ticket_id or ticket.customer is None:
            return None
        return ticket

    async def _get(self, path: str, params: Mapping[str, str] | None) -> httpx.Response:
        try:
            return await self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise BackendError(f"{path}: {type(exc).__name__}") from exc


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise BackendError("response is not JSON") from None


def _segment(value: str) -> str:
    # A ticket id is data: keep '/', '?' or '..' in it from changing the path.
    return quote(value, safe="")
