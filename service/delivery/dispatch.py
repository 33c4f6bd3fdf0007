"""One batch of Kafka records in, every notification sent, recorded or dead-lettered out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.core.backoff import backoff_delay
from service.core.directory import Directory
from service.core.events import ActivityEvent, InvalidEvent, parse_event
from service.core.failures import Failure, Stage
from service.core.message import message_id
from service.core.routing import Notification, RoutingPolicy, RoutingResult, route
from service.delivery.build import MailBatch, MailBuilder, NotBuilt, Outcome
from service.delivery.dead_letters import DeadLetterSink, Record, RetryLater
from service.delivery.ledger import DeadLetter, Entry, Key, Ledger, Status
from service.delivery.smtp import Mailer, PermanentSmtpError, TransientSmtpError
from service.delivery.workers import WorkerLost
from service.runtime.metrics import Metrics

log = logging.getLogger("service.delivery.dispatch")


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
    """

    sent: set[Key]
    deadline: float
    mails: MailBatch


@dataclass(frozen=True, slots=True)
class Routed:
    """A record that parsed, with what routing made of it."""

    event: ActivityEvent
    result: RoutingResult
    ids: dict[str, str]


def _key(n: Notification) -> Key:
    return Key(*n.key)


class Dispatcher:
    """Validate → route → render → send → record → count, for each record of a batch."""

    def __init__(
        self,
        *,
        config: DeliveryConfig,
        directory: Directory,
        builder: MailBuilder,
        ledger: Ledger,
        mailer: Mailer,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._directory = directory
        self._builder = builder
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
        done = await self._ledger.dead_lettered([r.where for r in records])
        pending = [r for r in records if r.where not in done]
        routed = {r.where: self._route(r) for r in pending}
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
        unsent = [
            n
            for item in routed.values()
            if isinstance(item, Routed)
            for n in item.result.notifications
            if _key(n) not in sent
        ]
        batch = _Batch(
            sent, time.monotonic() + self._config.retry_budget, self._builder.batch(unsent)
        )
        slots = asyncio.Semaphore(self._config.concurrency)

        async def serve(group: list[Record]) -> None:
            async with slots:
                for record in group:
                    # On shutdown, take no new record: what is left stays uncommitted.
                    if self._stopping.is_set():
                        raise RetryLater
                    await self._serve(record, routed[record.where], batch)

        try:
            results = await asyncio.gather(
                *(serve(group) for group in groups.values()), return_exceptions=True
            )
        finally:
            await batch.mails.close()
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, RetryLater):
                raise error
        if errors:
            raise errors[0]

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
            await self._dead_letter(record, {}, item.failure)
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
        outcome = await self._build(n, record, batch)
        if isinstance(outcome, NotBuilt):
            failure = Failure.of(outcome.failure.stage, f"{kind}: {outcome.failure.reason}")
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
                    return await self._fail(
                        n, msg_id, Failure.of(Stage.SMTP, f"{kind}: {exc}"), ids
                    )
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

    async def _build(self, n: Notification, record: Record, batch: _Batch) -> Outcome:
        """The message; a missing attachment is waited for, without rendering again."""
        try:
            outcome = await batch.mails.build(n)
            attempt = 0
            while isinstance(outcome, NotBuilt) and outcome.missing:
                # A file may be uploaded just after its event: wait for it, measured from
                # the record's timestamp so redeliveries do not restart the clock.
                written = (record.timestamp_ms or 0) / 1000
                if time.time() - written > self._config.attachment_wait:
                    break
                await self._backoff(attempt, batch.deadline)
                attempt += 1
                outcome = await batch.mails.rebuild(n, outcome)
        except WorkerLost:
            raise RetryLater from None
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
        delay = backoff_delay(attempt, self._config.retry_initial, self._config.retry_max)
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
        await self._dead_letters.send(record, Failure(stage, reason))
        ticket = record.key.decode("utf-8", "replace") if record.key else ids.get("ticket_id")
        await self._ledger.record_dead_letter(
            DeadLetter(record.where, stage, reason, ticket_id=ticket, event_id=ids.get("event_id"))
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
