"""A fake helpdesk backend for tests: the ticket-activity read API on 127.0.0.1, with controls."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

API = "/backend/api/v1"


@dataclass
class Stored:
    """One activity: its record as the API returns it, and the times the filters compare."""

    record: dict[str, Any]
    created: dt.datetime
    updated: dt.datetime | None  # None: never edited (used when updated_on_create is False)


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class FakeBackend:
    """Serves ticketActivities/, ticketActivities/{id}, tickets/{id}/ticketActivities/ and,
    when `tickets` is on, tickets/{id}. Listings are ordered by id.

    Knobs: `since` ("inclusive": >=, "exclusive": >), `updated_on_create` (False: updatedSince
    misses never-edited activities), `page_cap` (at most that many records per listing),
    `clock_offset` (seconds the backend's clock, Date header included, is ahead of `clock`),
    `auth` (a required header). Controls: add/update activities at chosen times,
    `fail_next(n)`, `hold_after(n)`/`release()` to block listings, `requests` to count.
    """

    def __init__(
        self,
        *,
        since: Literal["inclusive", "exclusive"] = "inclusive",
        updated_on_create: bool = True,
        page_cap: int | None = None,
        tickets: bool = True,
        clock_offset: float = 0.0,
        auth: tuple[str, str] | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.since_mode = since
        self.updated_on_create = updated_on_create
        self.page_cap = page_cap
        self.tickets_enabled = tickets
        self.clock_offset = clock_offset
        self.auth = auth
        self.activities: dict[int, Stored] = {}
        self.tickets: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._hold_after: int | None = None
        self._gate = threading.Event()
        self._gate.set()
        self.held = threading.Event()  # set while a listing waits at the closed gate
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- controls ---------------------------------------------------------------------------

    def now(self) -> dt.datetime:
        return self._clock() + dt.timedelta(seconds=self.clock_offset)

    def add(self, record: Mapping[str, Any], *, at: dt.datetime | None = None) -> dict[str, Any]:
        moment = at or self.now()
        with self._lock:
            stored = Stored(dict(record), moment, moment if self.updated_on_create else None)
            self.activities[int(record["id"])] = stored
            return dict(stored.record)

    def update(self, activity_id: int | str, *, at: dt.datetime | None = None, **changes: Any):
        with self._lock:
            stored = self.activities[int(activity_id)]
            stored.record.update(changes)
            stored.updated = at or self.now()
            return dict(stored.record)

    def add_ticket(self, ticket: Mapping[str, Any]) -> None:
        with self._lock:
            self.tickets[str(ticket["id"])] = dict(ticket)

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * n)

    def hold_after(self, listings: int) -> None:
        """Serve `listings` more listing requests, then block the next ones until release()."""
        with self._lock:
            self._hold_after = listings

    def release(self) -> None:
        with self._lock:
            self._hold_after = None
        self.held.clear()
        self._gate.set()

    def count(self, path: str = f"{API}/ticketActivities/") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path == path)

    # -- server -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeBackend:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (server threads) --------------------------------------------------

    def respond(self, path: str, query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(Request(path, query, headers))
            if self.auth and headers.get(self.auth[0].lower()) != self.auth[1]:
                return 401, {"error": "unauthorized"}
            if self._failures:
                return self._failures.pop(0), {"error": "injected"}
        parts = [unquote(p) for p in path.removeprefix(API).strip("/").split("/")]
        if parts == ["ticketActivities"]:
            return self._list(query, None)
        if len(parts) == 2 and parts[0] == "ticketActivities":
            found = self.activities.get(int(parts[1])) if parts[1].isdigit() else None
            return (200, found.record) if found else (404, {"error": "not found"})
        if len(parts) == 3 and parts[0] == "tickets" and parts[2] == "ticketActivities":
            return self._list(query, parts[1])
        if len(parts) == 2 and parts[0] == "tickets" and self.tickets_enabled:
            ticket = self.tickets.get(parts[1])
            return (200, ticket) if ticket else (404, {"error": "not found"})
        return 404, {"error": "no such endpoint"}

    def _list(self, query: dict[str, str], ticket_id: str | None) -> tuple[int, Any]:
        self._wait_at_gate()
        try:
            after = int(query["idAfter"]) if "idAfter" in query else None
            created = _time(query.get("createdSince"))
            updated = _time(query.get("updatedSince"))
        except ValueError:
            return 400, {"error": "bad filter"}
        with self._lock:
            rows = []
            for number, stored in sorted(self.activities.items()):
                if after is not None and number <= after:
                    continue
                if ticket_id is not None and str(stored.record.get("ticketID")) != ticket_id:
                    continue
                if created is not None and not self._since(stored.created, created):
                    continue
                if updated is not None and not self._since(stored.updated, updated):
                    continue
                rows.append(dict(stored.record))
        return 200, rows[: self.page_cap] if self.page_cap else rows

    def _since(self, moment: dt.datetime | None, since: dt.datetime) -> bool:
        if moment is None:
            return False
        return moment >= since if self.since_mode == "inclusive" else moment > since

    def _wait_at_gate(self) -> None:
        with self._lock:
            if self._hold_after is not None:
                if self._hold_after == 0:
                    self._gate.clear()
                else:
                    self._hold_after -= 1
        if not self._gate.is_set():
            self.held.set()
            self._gate.wait(timeout=60)


def _time(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _handler(backend: FakeBackend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            split = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body = backend.respond(split.path, query, headers)
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a test killed the bridge mid-request)

        def date_time_string(self, timestamp: float | None = None) -> str:
            # The Date header follows the backend's (possibly skewed) clock.
            return super().date_time_string(backend.now().timestamp())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
