"""One batch of Kafka records in, every notification sent, recorded or dead-lettered out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any

from service.core.directory import Directory
from service.core.events import InvalidEvent, parse_event
from service.core.failures import Failure, Stage
from service.core.history import HistoryGuard
from service.core.routing import route
from service.delivery.batches import BatchOpener, Routed, answering
from service.delivery.build import MailBuilder
from service.delivery.config import DeliveryConfig
from service.delivery.dead_letters import DeadLetterSink, Record, RetryLater
from service.delivery.ledger import DeadLetter, Ledger, ReminderRow
from service.delivery.outcomes import Ids, Outcomes
from service.delivery.reminding import Planning, ReminderConfig, Reminding
from service.delivery.sending import Batch, Sender
from service.delivery.smtp import Mailer
from service.runtime.metrics import Metrics

log = logging.getLogger("service.delivery.dispatch")

# `notifier dlq replay` marks a replayed record with the stage it was dead-lettered at; a
# record released from `throttled` is not throttled again (contract section 10).
REPLAYED_STAGE = "x-replayed-stage"
# On a revocation, in-flight records of the lost partitions get this long to finish, so
# the new owner finds them recorded rather than claimed.
REVOKE_WAIT_SECONDS = 10.0

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class _Planned:
    """What planning did to a batch: reminder rows to store, the nearest moment scheduled,
    and the records whose notifications changed (their .ics, their late reminders)."""

    rows: dict[tuple[str, str], ReminderRow]
    earliest: float | None
    changed: dict[tuple[str, int, int], Routed | InvalidEvent]


class Revoked(RetryLater):
    """The batch's partitions moved to another instance: stop, commit nothing, lose nothing."""


class Dispatcher:
    """Validate → route → claim → build → send → record, for each record of a batch."""

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
        reminders: ReminderConfig | None = None,
    ) -> None:
        self._config = config
        self._directory = directory
        self._builder = builder
        self._ledger = ledger
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._outcomes = Outcomes(ledger, metrics)
        self._opener = BatchOpener(config, ledger, builder)
        self._reminding = Reminding(reminders or ReminderConfig(), directory, metrics)
        self.on_scheduled: Callable[[float], None] = lambda moment: None
        """Told the nearest moment of each batch's newly scheduled reminders."""
        self._stopping = asyncio.Event()
        self._sender = Sender(config, ledger, mailer, self._outcomes, metrics, self._stopping)
        self._guard: HistoryGuard | None = None
        self._revocations: Counter[TopicPartition] = Counter()
        self._busy: Counter[TopicPartition] = Counter()
        self._idle = asyncio.Condition()

    def stop(self) -> None:
        """Abandon retries at once: unfinished records stay uncommitted and come back."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Shutting down: what is finished is committed at once."""
        return self._stopping.is_set()

    def revoke(self, partitions: set[TopicPartition]) -> None:
        """These partitions moved away: take no new record of them (in a running batch too)."""
        self._revocations.update(partitions)

    async def quiesce(self, partitions: set[TopicPartition]) -> None:
        """Return once no record of these partitions is in flight (the caller bounds it)."""
        async with self._idle:
            await self._idle.wait_for(lambda: not any(self._busy[tp] for tp in partitions))

    async def handle_batch(self, records: Sequence[Record]) -> None:
        """Serve a batch; raises RetryLater when any record must be fetched again.

        Records of one key (one ticket) on one partition are served in order; different
        keys are served concurrently, up to the configured concurrency. Parsing and routing
        are pure, so they run first. Then the ledger is visited twice before the first send:
        one look-up (which records were dead-lettered, the activities' stored reminders,
        which mails were sent, what the parents mailed), and one transaction that claims
        what is to be sent and stores the reminders the batch planned (so before any offset
        is committed).
        """
        if self._stopping.is_set():
            raise RetryLater
        snapshot = {
            (r.topic, r.partition): self._revocations[(r.topic, r.partition)] for r in records
        }
        guard = await self._history_guard()
        now = time.time()
        # Routing is pure: every record is routed first, so that one look into the ledger
        # answers what the batch needs before it is opened (BatchOpener.query).
        every = {r.where: self._route(r, guard, now) for r in records}
        facts = await self._ledger.look_up(
            BatchOpener.query(
                [r.where for r in records],
                [item for item in every.values() if isinstance(item, Routed)],
            )
        )
        pending = [r for r in records if r.where not in facts.dead_lettered]
        routed = {r.where: every[r.where] for r in pending}
        plan = self._plan_reminders(pending, routed, facts.reminders, now)
        routed.update(plan.changed)
        live = [item for item in routed.values() if isinstance(item, Routed) and not item.expired]
        # The reminders are stored in the claim's transaction, before anything is served.
        batch = await self._opener.open(live, facts, list(plan.rows.values()))
        if plan.earliest is not None:
            self.on_scheduled(plan.earliest)
        groups: dict[tuple[int, bytes | None], list[Record]] = defaultdict(list)
        for record in pending:
            groups[(record.partition, record.key)].append(record)
        slots = asyncio.Semaphore(self._config.concurrency)

        async def serve(group: list[Record]) -> None:
            async with slots:
                for record in group:
                    tp = (record.topic, record.partition)
                    # On shutdown, or once the partition moved away, take no new record:
                    # what is left stays uncommitted and is read again by its owner.
                    if self._stopping.is_set():
                        raise RetryLater
                    if self._revocations[tp] != snapshot[tp]:
                        raise Revoked
                    self._busy[tp] += 1
                    try:
                        await self._serve(record, routed[record.where], batch)
                    finally:
                        self._busy[tp] -= 1
                        async with self._idle:
                            self._idle.notify_all()

        try:
            results = await asyncio.gather(
                *(serve(group) for group in groups.values()), return_exceptions=True
            )
        finally:
            await self._opener.close(batch)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, RetryLater):
                raise error
        if errors:
            raise errors[0]

    def _plan_reminders(
        self,
        pending: list[Record],
        routed: dict[tuple[str, int, int], Routed | InvalidEvent],
        stored: list[ReminderRow],
        now: float,
    ) -> _Planned:
        """Schedule, move or cancel the batch's reminders (`stored`: the rows the ledger
        holds for its activities); staff mail gets its .ics entries."""
        items = [
            Planning(i, item.event, item.result, _written(record))
            for i, record in enumerate(pending)
            if isinstance(item := routed[record.where], Routed) and not item.expired
        ]
        plan = self._reminding.plan(items, stored, now)
        changed: dict[tuple[str, int, int], Routed | InvalidEvent] = {}
        for i, record in enumerate(pending):
            item = routed[record.where]
            if not isinstance(item, Routed):
                continue
            if i not in plan.notifications and i not in plan.expired:
                continue
            result = item.result
            if i in plan.notifications:
                result = replace(result, notifications=plan.notifications[i])
            changed[record.where] = replace(
                item, result=result, late_reminders=tuple(plan.expired.get(i, ()))
            )
        return _Planned(plan.rows, plan.earliest, changed)

    async def send_reminders(self, rows: list[ReminderRow]) -> None:
        """Due reminders this instance took: their mails, through the same path as events."""
        due: list[tuple[ReminderRow, Record, Routed]] = []
        for row in rows:
            try:
                event, result, record = self._reminding.due(row)
            except InvalidEvent:
                await self._ledger.finish_reminder(row, "failed")
                self._metrics.reminder("failed")
                log.error("reminder event unreadable", extra={"activity_id": row.activity_id})
                continue
            activity = event.data.activity
            ids = Ids(event.id, activity.id, activity.ticket_id, event.time)
            due.append((row, record, Routed(event, result, ids)))
        if not due:
            return
        batch = await self._opener.open([routed for _, _, routed in due])
        try:
            for row, record, routed in due:
                try:
                    failed = await self._serve(record, routed, batch, count_event=False)
                except RetryLater:
                    continue  # taken again by anyone once its lease ends
                state = "failed" if failed else "sent"
                if await self._ledger.finish_reminder(row, state):
                    self._metrics.reminder(state)
        finally:
            await self._opener.close(batch)

    async def _history_guard(self) -> HistoryGuard:
        """The group's first start on this ledger, asked once (section 10)."""
        if self._guard is None:
            first = await self._ledger.first_start(self._config.group_id, time.time())
            self._guard = HistoryGuard(
                first, self._config.history_grace, self._config.max_event_age
            )
        return self._guard

    def _route(self, record: Record, guard: HistoryGuard, now: float) -> Routed | InvalidEvent:
        try:
            event = parse_event(record.value, dict(record.headers))
        except InvalidEvent as exc:
            return exc
        activity = event.data.activity
        ids = Ids(event.id, activity.id, activity.ticket_id, event.time)
        written = _written(record)
        released = dict(record.headers).get(REPLAYED_STAGE) == Stage.THROTTLED.value.encode()
        return Routed(
            event,
            route(event, self._directory, self._config.policy),
            ids,
            expired=guard.reason(written, now),
            released=released,
        )

    async def _serve(
        self, record: Record, item: Routed | InvalidEvent, batch: Batch, *, count_event: bool = True
    ) -> bool:
        """Serve one record; returns, once it may be committed, whether it was dead-lettered."""
        if isinstance(item, InvalidEvent):
            await self._dead_letter(record, None, item.failure)
            self._metrics.event(None, "dead_lettered")
            return True
        result, ids = item.result, item.ids
        if item.expired:
            await self._outcomes.expired(
                [*result.notifications, *result.withheld], ids, item.expired
            )
            self._metrics.event(item.event.type, "expired")
            return False
        if item.late_reminders:
            await self._outcomes.expired(list(item.late_reminders), ids, "too late when read")
        if result.unresolved or result.withheld:
            await asyncio.gather(
                *(self._outcomes.unresolved(u, ids) for u in result.unresolved),
                *(self._outcomes.withheld(n, ids) for n in result.withheld),
            )
        # A parent earlier in this batch (same ticket, so served before) counts too.
        notifications = [answering(n, batch.parent_mails) for n in result.notifications]
        outcomes = await _all_settled(
            [self._sender.deliver(n, ids, record, batch) for n in notifications]
        )
        failures: list[Failure] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if count_event:
                    self._metrics.event(item.event.type, "retry_later")
                raise outcome
            if outcome is not None:
                failures.append(outcome)
        if failures:
            await self._dead_letter(record, ids, *failures)
        if count_event:
            self._metrics.event(item.event.type, "dead_lettered" if failures else "processed")
        return bool(failures)

    async def _dead_letter(self, record: Record, ids: Ids | None, *failures: Failure) -> None:
        # A record with a throttled mail is dead-lettered as `throttled`, so that
        # `notifier dlq replay --stage throttled` releases it.
        stage = next((f.stage for f in failures if f.stage is Stage.THROTTLED), failures[0].stage)
        reason = "; ".join(f.reason for f in failures)[:900]
        await self._dead_letters.send(record, Failure(stage, reason))
        ticket = record.key.decode("utf-8", "replace") if record.key else None
        await self._ledger.record_dead_letter(
            DeadLetter(
                record.where,
                stage.value,
                reason,
                ticket_id=ticket or (ids.ticket_id if ids else None),
                event_id=ids.event_id if ids else None,
            )
        )
        self._metrics.dead_letter(stage)
        log.error(
            "dead-lettered",
            extra={
                **(ids.fields() if ids else {}),
                "outcome": "dead_lettered",
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "stage": stage.value,
            },
        )


def _written(record: Record) -> float | None:
    """The record's Kafka timestamp, in epoch seconds."""
    return record.timestamp_ms / 1000 if record.timestamp_ms is not None else None


async def _all_settled(
    deliveries: list[Coroutine[Any, Any, Failure | None]],
) -> list[Failure | BaseException | None]:
    """`gather(..., return_exceptions=True)`, without a task for the usual single mail."""
    if len(deliveries) == 1:
        try:
            return [await deliveries[0]]
        except Exception as error:  # the caller re-raises it, as gather's result would
            return [error]
    return await asyncio.gather(*deliveries, return_exceptions=True)
