"""The bridge: polls the backend's activity listings and publishes new and changed activities."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.backoff import backoff_delay
from service.core.events import InvalidEvent, Ticket
from service.producer.backend import BackendClient, BackendError, Filter, TicketsUnsupported
from service.producer.cursor import (
    Cursor,
    CursorError,
    CursorFile,
    Phase,
    Seen,
    begin_round,
    classify,
    commit_page,
    content_digest,
    event_id_for,
    finish_phase,
    initial_cursor,
    pageable,
    published_before,
)
from service.producer.publisher import (
    InvalidActivity,
    Outgoing,
    Publisher,
    build_event,
    validate_activity,
)

log = logging.getLogger("service.producer.bridge")

ENV_PREFIX = "NOTIFY_BRIDGE_"
FILTERS: dict[Phase, Filter] = {"created": "createdSince", "updated": "updatedSince"}
POLL_OUTCOMES = ("ok", "backend_error", "kafka_error", "cursor_error", "error")


class BridgeSettings(BaseSettings):
    """Settings of `notifier bridge` (NOTIFY_BRIDGE_*); Kafka's come from NOTIFY_*."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    backend_url: str
    auth_header_name: str = "Authorization"
    auth_header_value: SecretStr | None = None
    interval_seconds: float = Field(default=10.0, gt=0)
    page_size: int = Field(default=100, ge=1, le=10_000)
    cursor_file: Path = Path("var/bridge-cursor.json")
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    # Must exceed the backend's clock lag behind ours (when it sends no Date header), its
    # transaction time and a request's duration: see docs/bridge.md.
    overlap_seconds: float = Field(default=60.0, ge=0)
    start_from: dt.datetime | None = None
    enrich_tickets: bool = True
    backoff_initial_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=60.0, gt=0)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8001, ge=0, le=65535)

    @field_validator("backend_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("start_from")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone (e.g. 2026-11-27T09:00:00Z)")
        return value


class BridgeMetrics:
    """The bridge's Prometheus metrics, registered in the registry given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._covered: float | None = None
        self.polls = Counter(
            "notifier_bridge_polls", "Poll rounds by outcome.", ["outcome"], registry=registry
        )
        self.published = Counter(
            "notifier_bridge_published_events",
            "Events Kafka acknowledged, by type.",
            ["type"],
            registry=registry,
        )
        self.skipped = Counter(
            "notifier_bridge_skipped_activities",
            "Listed activities not published, by reason.",
            ["reason"],
            registry=registry,
        )
        self.cursor_time = Gauge(
            "notifier_bridge_cursor_timestamp_seconds",
            "The cursor: listings ask for changes since this instant.",
            registry=registry,
        )
        self.lag = Gauge(
            "notifier_bridge_lag_seconds",
            "Seconds since the instant before which every backend change is published.",
            registry=registry,
        )
        self.lag.set_function(self._lag)
        for outcome in POLL_OUTCOMES:
            self.polls.labels(outcome)
        for kind in ("created", "updated"):
            self.published.labels(kind)
        for reason in ("unchanged", "invalid"):
            self.skipped.labels(reason)

    def observe(self, cursor: Cursor) -> None:
        self.cursor_time.set(cursor.since.timestamp())
        self._covered = cursor.covered.timestamp()

    def _lag(self) -> float:
        return 0.0 if self._covered is None else max(time.time() - self._covered, 0.0)


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, BackendError):
        return "backend_error"
    if isinstance(exc, KafkaError):
        return "kafka_error"
    if isinstance(exc, OSError):
        return "cursor_error"
    return "error"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Bridge:
    """Polls the backend and publishes; `run()` forever, or `poll()` for one round.

    Each round lists `createdSince=<cursor>`, then `updatedSince=<cursor>`, both paged by
    `idAfter`, and publishes every activity not yet published with its current content;
    the durable cursor moves only after Kafka acknowledged a page (acks=all). Both filters
    are asked because a backend may leave the update time of a never-edited activity empty,
    so `updatedSince` alone could miss new ones. docs/bridge.md: why nothing is skipped.
    """

    def __init__(
        self,
        settings: BridgeSettings,
        backend: BackendClient,
        publisher: Publisher,
        store: CursorFile,
        metrics: BridgeMetrics,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._overlap = dt.timedelta(seconds=settings.overlap_seconds)
        self._backend = backend
        self._publisher = publisher
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._enrich = settings.enrich_tickets
        self._cursor: Cursor | None = None

    async def run(self) -> None:
        """Poll every interval until cancelled; a failed round backs off and is resumed."""
        failures = 0
        while True:
            try:
                await self.poll()
            except CursorError:
                raise  # the operator decides; starting over could skip or repeat
            except Exception as exc:
                failures += 1
                outcome = outcome_of(exc)
                self._metrics.polls.labels(outcome).inc()
                delay = backoff_delay(
                    failures - 1,
                    self._settings.backoff_initial_seconds,
                    self._settings.backoff_max_seconds,
                )
                # BackendError's message is ours (path, status); others may quote input.
                detail = str(exc) if isinstance(exc, BackendError) else type(exc).__name__
                log.warning(
                    "poll failed", extra={"outcome": outcome, "error": detail, "retry_in": delay}
                )
                await self._sleep(delay)
                continue
            failures = 0
            self._metrics.polls.labels("ok").inc()
            await self._sleep(self._settings.interval_seconds)

    async def load(self) -> Cursor:
        """The durable cursor; a fresh one is saved at once so a restart keeps its start."""
        if self._cursor is None:
            cursor = await asyncio.to_thread(self._store.load)
            if cursor is None:
                now = self._clock()
                if self._settings.start_from is None:
                    # The backend's clock, if behind ours, so the start is "now" for it too.
                    server = await self._backend.server_time()
                    now = min(now, server) if server else now
                cursor = initial_cursor(now, self._overlap, self._settings.start_from)
                await self._save(cursor)
                log.info("new cursor", extra={"since": cursor.since.isoformat()})
            self._cursor = cursor
            self._metrics.observe(cursor)
        return self._cursor

    async def poll(self) -> None:
        """One round, resumed where the durable cursor stands: both listings, page by page."""
        cursor = await self.load()
        started = self._clock()  # before the request: changes after it are next round's
        tickets: dict[str, Ticket | None] = {}
        while True:
            phase = cursor.phase
            listing = await self._backend.list_activities(
                FILTERS[phase], cursor.since, cursor.after_id
            )
            if cursor.round_started is None:
                # The backend's own clock, when it tells it and is behind ours, so clock skew
                # cannot move the cursor past changes it has not shown yet.
                server = listing.server_time
                cursor = begin_round(cursor, min(started, server) if server else started)
                self._cursor = cursor  # not yet durable: a crash now just redoes the round
            received = self._clock().timestamp()
            records, unnumbered = pageable(listing.records, cursor.after_id)
            for position in unnumbered:
                self._metrics.skipped.labels("invalid").inc()
                log.warning("activity without an integer id", extra={"position": position})
            if not records:
                cursor = finish_phase(cursor, self._overlap)
                await self._save(cursor)
                if phase == "updated":
                    log.debug("round done", extra={"since": cursor.since.isoformat()})
                    return
                continue
            size = self._settings.page_size
            for start in range(0, len(records), size):
                page = records[start : start + size]
                cursor = await self._publish_page(cursor, page, received, tickets)

    async def _publish_page(
        self,
        cursor: Cursor,
        page: Sequence[tuple[int, Mapping[str, Any]]],
        received: float,
        tickets: dict[str, Ticket | None],
    ) -> Cursor:
        """Publish a page's new and changed activities, then commit the cursor past it."""
        outgoing: list[tuple[Phase, Outgoing]] = []
        entries: dict[str, Seen] = {}
        digests = {number: content_digest(record) for number, record in page}
        created: set[int] = set()
        if cursor.phase == "updated":
            # New to the bridge: created since the cursor (during this round, or while the
            # bridge was down), or an older activity edited? Only createdSince can tell.
            fresh = [n for n, d in digests.items() if classify(cursor, str(n), d, created=True)]
            fresh = [n for n in fresh if not published_before(cursor, str(n))]
            if fresh:
                created = await self._backend.created_among(cursor.since, fresh)
        for number, record in page:
            key, digest = str(number), digests[number]
            kind = classify(cursor, key, digest, created=number in created)
            if kind is None:
                entries[key] = replace(cursor.seen[key], at=received)
                self._metrics.skipped.labels("unchanged").inc()
                continue
            try:
                ticket = await self._ticket(validate_activity(record).ticket_id, tickets)
                event = build_event(
                    record,
                    type=kind,
                    ticket=ticket,
                    event_id=event_id_for(key, kind, digest),
                    time=self._clock(),
                )
            except (InvalidActivity, InvalidEvent) as exc:
                field = exc.field if isinstance(exc, InvalidActivity) else exc.stage
                log.warning("activity invalid", extra={"activity_id": key, "field": field})
                self._metrics.skipped.labels("invalid").inc()
                entries[key] = Seen(digest, received, published=False)
                continue
            outgoing.append((kind, event))
            entries[key] = Seen(digest, received)
        if outgoing:
            await self._publisher.send([event for _, event in outgoing])
        cursor = commit_page(cursor, page[-1][0], entries)
        await self._save(cursor)
        for kind, event in outgoing:
            self._metrics.published.labels(kind).inc()
            ids = {"activity_id": event.activity_id, "ticket_id": event.ticket_id}
            log.info("published", extra={**ids, "type": kind, "event_id": event.event_id})
        return cursor

    async def _ticket(self, ticket_id: str, cache: dict[str, Ticket | None]) -> Ticket | None:
        if not self._enrich:
            return None
        if ticket_id not in cache:
            try:
                cache[ticket_id] = await self._backend.ticket(ticket_id)
            except TicketsUnsupported:
                # Asked once; from now on events go without data.ticket and the consumer
                # takes the ticket and its customer from its directory.
                self._enrich = False
                log.info("backend offers no ticket lookup", extra={"ticket_id": ticket_id})
                return None
        return cache[ticket_id]

    async def _save(self, cursor: Cursor) -> None:
        await asyncio.to_thread(self._store.save, cursor)
        self._cursor = cursor
        self._metrics.observe(cursor)
