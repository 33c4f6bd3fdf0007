"""One batch of Kafka records in, every notification sent, recorded or dead-lettered out."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.core.directory import Directory
from service.core.events import ActivityEvent, InvalidEvent, parse_event
from service.core.message import message_id
from service.core.routing import Notification, RoutingPolicy, RoutingResult, route
from service.delivery.ledger import DeadLetter, Entry, Key, Ledger, Status, Where
from service.delivery.prepare import NotPrepared, Outcome, PreparePool, Preparer, WorkerLost
from service.delivery.smtp import Mailer, PermanentSmtpError, TransientSmtpError
from service.runtime.metrics import Metrics

log = logging.getLogger("service.delivery.dispatch")


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record, independent of the client library that fetched it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None


class DeadLetterSink(Protocol):
    """Where records that cannot be served go, with the reason."""

    async def send(self, record: Record, stage: str, reason: str) -> None: ...


class RetryLater(Exception):
    """A transient failure outlived the in-process retry budget: rewind, commit nothing."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A permanent failure of one notification (or of the whole record)."""

    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The settings the dispatcher needs, as plain values."""

    envelope_from: str
    domain: str
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    concurrency: int = 64
    retry_initial: float = 0.5
    retry_max: float = 30.0
    retry_budget: float = 120.0
    attachment_wait: float = 300.0


@dataclass(slots=True)
class _Batch:
    """What the records of one batch share while they are served.

    `sent` holds the keys the ledger knew at the start of the batch plus every key sent
    since, so a later record of the same activity in this batch skips them too.
    `prepared` maps a notification (by identity) to its chunk in the worker pool.
    """

    sent: set[Key]
    deadline: float
    chunks: list[asyncio.Task[list[Outcome]]] = field(default_factory=list)
    prepared: dict[int, tuple[asyncio.Task[list[Outcome]], int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Routed:
    """A record that parsed, with what routing made of it."""

    event: ActivityEvent
    result: RoutingResult
    ids: dict[str, str]


def _where(record: Record) -> Where:
    return (record.topic, record.partition, record.offset)


def _key(n: Notification) -> Key:
    return Key(*n.key)


class Dispatcher:
    """Validate → route → render → send → record → count, for each record of a batch."""

    def __init__(
        self,
        *,
        config: DeliveryConfig,
        directory: Directory,
        preparer: Preparer,
        ledger: Ledger,
        mailer: Mailer,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        pool: PreparePool | None = None,
    ) -> None:
        self._config = config
        self._directory = directory
        self._preparer = preparer
        self._pool = pool
        self._ledger = ledger
        self._mailer = mailer
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Abandon retries at once: unfinished records stay uncommitted and come back."""
        self._stopping.set()

    async def handle_batch(self, records: Sequence[Record]) -> None:
        """Serve a batch; raises RetryLater when any record must be fetched again.

        Records of one key (one ticket) on one partition are served in order; different
        keys are served concurrently, up to the configured concurrency. Parsing and routing
        are pure, so they run first, and the ledger is asked once for the whole batch.
        """
        if self._stopping.is_set():
            raise RetryLater
        done = await self._ledger.dead_lettered([_where(r) for r in records])
        pending = [r for r in records if _where(r) not in done]
        routed = {_where(r): self._route(r) for r in pending}
        sent = await self._ledger.sent(
            [
                _key(n)
                for item in routed.values()
                if isinstance(item, Routed)
                for n in item.result.notifications
            ]
        )
        groups: dict[tuple[int, bytes | None], list[Record]] = defaultdict(list)
        for record in pending:
            groups[(record.partition, record.key)].append(record)
        batch = _Batch(sent, time.monotonic() + self._config.retry_budget)
        self._submit(batch, routed.values())
        slots = asyncio.Semaphore(self._config.concurrency)

        async def serve(group: list[Record]) -> None:
            async with slots:
                for record in group:
                    # On shutdown, take no new record: what is left stays uncommitted.
                    if self._stopping.is_set():
                        raise RetryLater
                    await self._serve(record, routed[_where(record)], batch)

        try:
            results = await asyncio.gather(
                *(serve(group) for group in groups.values()), return_exceptions=True
            )
        finally:
            # Chunks nobody waited for (a record failed, or shutdown): collect them quietly.
            for task in batch.chunks:
                task.cancel()
            await asyncio.gather(*batch.chunks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, RetryLater):
                raise error
        if errors:
            raise errors[0]

    def _submit(self, batch: _Batch, routed: Iterable[Routed | InvalidEvent]) -> None:
        """Hand the batch's unsent mails without attachments to the worker pool, in order.

        Mails with attachments are built here, just before they are sent, as without a
        pool: a batch built ahead in full could hold gigabytes of attachments at once,
        while no more than `concurrency` records are in flight here.
        """
        if self._pool is None:
            return
        todo = [
            n
            for item in routed
            if isinstance(item, Routed)
            for n in item.result.notifications
            if _key(n) not in batch.sent and not n.attachments
        ]
        for chunk in self._pool.chunks(todo):
            task = asyncio.create_task(self._pool.prepare(chunk))
            batch.chunks.append(task)
            for i, n in enumerate(chunk):
                batch.prepared[id(n)] = (task, i)

    def _route(self, record: Record) -> Routed | InvalidEvent:
        try:
            event = parse_event(record.value, dict(record.headers))
        except InvalidEvent as exc:
            return exc
        ids = {
            "event_id": event.id,
            "activity_id": event.data.activity.id,
            "ticket_id": event.data.activity.ticket_id,
        }
        return Routed(event, route(event, self._directory, self._config.policy), ids)

    async def _serve(self, record: Record, item: Routed | InvalidEvent, batch: _Batch) -> None:
        """Serve one record; returns when it may be committed."""
        if isinstance(item, InvalidEvent):
            await self._dead_letter(record, {}, Failure(item.stage, item.reason))
            self._metrics.event(None, "dead_lettered")
            return
        event, result, ids = item.event, item.result, item.ids
        for unresolved in result.unresolved:
            self._metrics.notification("unknown", "unresolved")
            log.warning(
                "unresolved recipient",
                extra={
                    **ids,
                    "outcome": "unresolved",
                    "field": unresolved.field,
                    "token": unresolved.token[:100],
                },
            )
        for withheld in result.withheld:
            self._metrics.notification(withheld.kind.value, "withheld")
            log.info(
                "supplier mail withheld: personal data",
                extra={**ids, "kind": withheld.kind.value, "outcome": "withheld"},
            )
        todo = []
        for n in result.notifications:
            if _key(n) in batch.sent:
                self._metrics.notification(n.kind.value, "skipped_duplicate")
                log.info(
                    "already sent",
                    extra={**ids, "kind": n.kind.value, "outcome": "skipped_duplicate"},
                )
            else:
                todo.append(n)
        outcomes = await asyncio.gather(
            *(self._deliver(n, event, record, batch) for n in todo),
            return_exceptions=True,
        )
        failures: list[Failure] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                self._metrics.event(event.type, "retry_later")
                raise outcome
            if outcome is not None:
                failures.append(outcome)
        if failures:
            await self._dead_letter(record, ids, *failures)
            self._metrics.event(event.type, "dead_lettered")
        else:
            self._metrics.event(event.type, "processed")

    async def _deliver(
        self, n: Notification, event: ActivityEvent, record: Record, batch: _Batch
    ) -> Failure | None:
        kind = n.kind.value
        ids = {
            "event_id": event.id,
            "activity_id": n.activity_id,
            "ticket_id": n.ticket_id,
            "kind": kind,
        }
        msg_id = message_id(n, self._config.domain)
        outcome = await self._prepare(n, record, batch)
        if isinstance(outcome, NotPrepared):
            failure = Failure(outcome.stage, f"{kind}: {outcome.reason}")
            return await self._fail(n, msg_id, failure, ids)
        self._metrics.rendered(outcome.render_seconds)
        attempt = 0
        with self._metrics.in_flight():
            while True:
                try:
                    await self._mailer.send(
                        self._config.envelope_from, n.recipient.email, outcome.data
                    )
                    break
                except PermanentSmtpError as exc:
                    return await self._fail(n, msg_id, Failure("smtp", f"{kind}: {exc}"), ids)
                except TransientSmtpError as exc:
                    self._metrics.notification(kind, "failed_transient")
                    # The server's reply text may quote the address: log its code only.
                    log.warning(
                        "transient smtp failure, retrying",
                        extra={
                            **ids,
                            "outcome": "failed_transient",
                            "attempt": attempt,
                            "smtp_code": exc.code,
                        },
                    )
                    await self._backoff(attempt, batch.deadline)
                    attempt += 1
        await self._ledger.record(
            Entry(_key(n), Status.SENT, msg_id, ticket_id=n.ticket_id, event_id=event.id)
        )
        batch.sent.add(_key(n))
        self._metrics.notification(kind, "sent")
        self._metrics.delivered(event.time)
        log.info("sent", extra={**ids, "outcome": "sent", "message_id": msg_id})
        return None

    async def _prepare(self, n: Notification, record: Record, batch: _Batch) -> Outcome:
        """The message from the worker pool, or built here; waits for missing attachments."""
        handle = batch.prepared.get(id(n))
        if handle is None:
            outcome = self._preparer.prepare(n)
        else:
            chunk, i = handle
            try:
                outcome = (await chunk)[i]
            except WorkerLost:
                raise RetryLater from None
        attempt = 0
        while isinstance(outcome, NotPrepared) and outcome.missing:
            # A file may be uploaded just after its event: wait for it, measured from the
            # record's timestamp so redeliveries do not restart the clock.
            written = (record.timestamp_ms or 0) / 1000
            if time.time() - written > self._config.attachment_wait:
                break
            await self._backoff(attempt, batch.deadline)
            attempt += 1
            outcome = self._preparer.prepare(n)
        return outcome

    async def _fail(
        self, n: Notification, msg_id: str, failure: Failure, ids: dict[str, str]
    ) -> Failure:
        await self._ledger.record(
            Entry(
                _key(n),
                Status.FAILED,
                msg_id,
                ticket_id=n.ticket_id,
                event_id=ids.get("event_id"),
                stage=failure.stage,
                reason=failure.reason,
            )
        )
        self._metrics.notification(n.kind.value, "failed_permanent")
        log.error(
            "permanent failure",
            extra={**ids, "outcome": "failed_permanent", "stage": failure.stage},
        )
        return failure

    async def _backoff(self, attempt: int, deadline: float) -> None:
        """Capped exponential backoff, jittered over its upper half; RetryLater past the budget."""
        self._metrics.retry()
        delay = min(self._config.retry_max, self._config.retry_initial * 2**attempt)
        delay = random.uniform(delay / 2, delay)
        if self._stopping.is_set() or time.monotonic() + delay > deadline:
            raise RetryLater
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        except TimeoutError:
            return
        raise RetryLater

    async def _dead_letter(self, record: Record, ids: dict[str, str], *failures: Failure) -> None:
        stage = failures[0].stage
        reason = "; ".join(f.reason for f in failures)[:900]
        await self._dead_letters.send(record, stage, reason)
        ticket = record.key.decode("utf-8", "replace") if record.key else ids.get("ticket_id")
        await self._ledger.record_dead_letter(
            DeadLetter(
                _where(record), stage, reason, ticket_id=ticket, event_id=ids.get("event_id")
            )
        )
        self._metrics.dead_letter(stage)
        log.error(
            "dead-lettered",
            extra={
                **ids,
                "outcome": "dead_lettered",
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "stage": stage,
            },
        )
