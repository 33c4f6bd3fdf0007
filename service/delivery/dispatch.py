"""One batch of Kafka records in, every notification sent, recorded or dead-lettered out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from service.core.directory import Directory
from service.core.events import ActivityEvent, InvalidEvent, parse_event
from service.core.failures import Failure, Stage
from service.core.history import HistoryGuard
from service.core.routing import Kind, Notification, RoutingResult, route
from service.delivery.build import MailBuilder
from service.delivery.config import DeliveryConfig
from service.delivery.dead_letters import DeadLetterSink, Record, RetryLater
from service.delivery.ledger import Claim, ClaimRequest, DeadLetter, Key, Ledger
from service.delivery.outcomes import Ids, Outcomes, key_of
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


class Revoked(RetryLater):
    """The batch's partitions moved to another instance: stop, commit nothing, lose nothing."""


@dataclass(frozen=True, slots=True)
class Routed:
    """A record that parsed, with what routing made of it."""

    event: ActivityEvent
    result: RoutingResult
    ids: Ids
    expired: str | None = None  # why it mails nobody (history, too old), if so
    released: bool = False  # replayed from the `throttled` dead letters


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
    ) -> None:
        self._config = config
        self._directory = directory
        self._builder = builder
        self._ledger = ledger
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._outcomes = Outcomes(ledger, metrics)
        self._stopping = asyncio.Event()
        self._sender = Sender(config, ledger, mailer, self._outcomes, metrics, self._stopping)
        self._guard: HistoryGuard | None = None
        self._revocations: Counter[TopicPartition] = Counter()
        self._busy: Counter[TopicPartition] = Counter()
        self._idle = asyncio.Condition()

    def stop(self) -> None:
        """Abandon retries at once: unfinished records stay uncommitted and come back."""
        self._stopping.set()

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
        are pure, so they run first, and the ledger is asked once per batch for what was
        sent, for the parents' mails, and to claim what is to be sent.
        """
        if self._stopping.is_set():
            raise RetryLater
        snapshot = {
            (r.topic, r.partition): self._revocations[(r.topic, r.partition)] for r in records
        }
        done = await self._ledger.dead_lettered([r.where for r in records])
        pending = [r for r in records if r.where not in done]
        guard = await self._history_guard()
        now = time.time()
        routed = {r.where: self._route(r, guard, now) for r in pending}
        live = [item for item in routed.values() if isinstance(item, Routed) and not item.expired]
        keys = [key_of(n) for item in live for n in item.result.notifications]
        sent = await self._ledger.sent(keys)
        parents = await self._parent_mails(live, sent)
        unsent = [
            _answering(n, parents)
            for item in live
            for n in item.result.notifications
            if key_of(n) not in sent
        ]
        claims, claimed_at = await self._claim(live, sent)
        await self._record_tickets(live)
        batch = Batch(
            sent=sent,
            claims=claims,
            leases=dict.fromkeys(
                (k for k, c in claims.items() if c is Claim.WON),
                claimed_at + self._config.lease_seconds,
            ),
            deadline=time.monotonic() + self._config.retry_budget,
            mails=self._builder.batch(unsent),
            parent_mails=parents,
        )
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
            await batch.mails.close()
            await self._release(batch)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, RetryLater):
                raise error
        if errors:
            raise errors[0]

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
        written = record.timestamp_ms / 1000 if record.timestamp_ms is not None else None
        released = dict(record.headers).get(REPLAYED_STAGE) == Stage.THROTTLED.value.encode()
        return Routed(
            event,
            route(event, self._directory, self._config.policy),
            ids,
            expired=guard.reason(written, now),
            released=released,
        )

    async def _parent_mails(
        self, live: list[Routed], sent: set[Key]
    ) -> dict[tuple[str, str], dict[str, str]]:
        """What the parents of the batch's follow-ups mailed to the same recipients."""
        pairs = {
            (n.parent_activity_id, key_of(n).recipient)
            for item in live
            for n in item.result.notifications
            if n.parent_activity_id and key_of(n) not in sent
        }
        return await self._ledger.sent_mails(sorted(pairs)) if pairs else {}

    async def _claim(self, live: list[Routed], sent: set[Key]) -> tuple[dict[Key, Claim], float]:
        """Claim the batch's unsent keys in one transaction; the claims and when they began."""
        requests: dict[Key, ClaimRequest] = {}
        for item in live:
            for n in item.result.notifications:
                key = key_of(n)
                if key not in sent and key not in requests:
                    requests[key] = ClaimRequest(
                        key, n.ticket_id, item.ids.event_id, bypass_limit=item.released
                    )
        started = time.monotonic()  # before the request: the local lease ends no later
        claims = await self._ledger.claim(
            list(requests.values()),
            self._config.owner,
            self._config.lease_seconds,
            self._config.recipient_limit,
        )
        return claims, started

    async def _record_tickets(self, live: list[Routed]) -> None:
        """Ticket references, so the audit finds a ticket by them."""
        references = {
            n.ticket_id: n.ticket_reference
            for item in live
            for n in (*item.result.notifications, *item.result.withheld)
            if n.ticket_reference
        }
        await asyncio.gather(
            *(self._ledger.record_ticket(t, r) for t, r in sorted(references.items()))
        )

    async def _release(self, batch: Batch) -> None:
        """Give back the claims this batch won and did not finish (a rewind, a revocation)."""
        unfinished = [k for k in batch.leases if k not in batch.finished]
        if unfinished:
            await self._ledger.release(unfinished, self._config.owner)

    async def _serve(self, record: Record, item: Routed | InvalidEvent, batch: Batch) -> None:
        """Serve one record; returns when it may be committed."""
        if isinstance(item, InvalidEvent):
            await self._dead_letter(record, None, item.failure)
            self._metrics.event(None, "dead_lettered")
            return
        result, ids = item.result, item.ids
        if item.expired:
            await self._outcomes.expired(
                [*result.notifications, *result.withheld], ids, item.expired
            )
            self._metrics.event(item.event.type, "expired")
            return
        await asyncio.gather(
            *(self._outcomes.unresolved(u, ids) for u in result.unresolved),
            *(self._outcomes.withheld(n, ids) for n in result.withheld),
        )
        # A parent earlier in this batch (same ticket, so served before) counts too.
        notifications = [_answering(n, batch.parent_mails) for n in result.notifications]
        outcomes = await asyncio.gather(
            *(self._sender.deliver(n, ids, record, batch) for n in notifications),
            return_exceptions=True,
        )
        failures: list[Failure] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                self._metrics.event(item.event.type, "retry_later")
                raise outcome
            if outcome is not None:
                failures.append(outcome)
        if failures:
            await self._dead_letter(record, ids, *failures)
            self._metrics.event(item.event.type, "dead_lettered")
        else:
            self._metrics.event(item.event.type, "processed")

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


def _answering(n: Notification, mails: dict[tuple[str, str], dict[str, str]]) -> Notification:
    """`n`, answering the parent activity's mail to the same recipient if there is one
    (of the same kind if it got several)."""
    if not n.parent_activity_id:
        return n
    got = mails.get((n.parent_activity_id, key_of(n).recipient), {})
    parent = got.get(n.kind.value) or next((got[k.value] for k in Kind if k.value in got), None)
    return replace(n, in_reply_to=parent) if parent != n.in_reply_to else n
