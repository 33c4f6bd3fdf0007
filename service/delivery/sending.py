"""One notification from its claim to the SMTP server's acceptance, fenced by its lease.

A notification is sent only under this instance's claim in the shared ledger. The claim
has a lease; the local clock says when it ends, measured from before the claim was asked
for, so it never ends later here than in the database. The lease is renewed (once half of
it is gone) with an SMTP connection in hand, right before the transaction, so the
transaction (bounded by the SMTP timeout, at most half the lease) and the record after it
end within it, however long the mail waited for a connection. The last thing before the
server takes the mail (the end of DATA) is a look at that clock: an instance that stalled
past its lease (a GC pause, a frozen VM, SIGSTOP) and wakes mid-send drops the mail
unfinished, since another instance may have taken the notification over meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from service.core.backoff import backoff_delay
from service.core.failures import Failure, Stage
from service.core.message import message_id
from service.core.routing import Notification
from service.delivery.build import MailBatch, NotBuilt, Outcome
from service.delivery.config import DeliveryConfig
from service.delivery.dead_letters import Record, RetryLater
from service.delivery.ledger import Claim, ClaimRequest, Key, Ledger
from service.delivery.outcomes import Ids, Outcomes
from service.delivery.smtp import Mailer, PermanentSmtpError, TransientSmtpError
from service.delivery.smtp_wire import Withheld
from service.delivery.workers import WorkerLost
from service.runtime.metrics import Metrics


@dataclass(slots=True)
class Batch:
    """What the records of one batch share while they are served.

    `sent` holds the keys the ledger knew at the start of the batch plus every key sent
    since, so a later record of the same activity in this batch skips them too. `leases`
    says until when (local monotonic clock) this instance holds each key it claimed.
    """

    sent: set[Key]
    claims: dict[Key, Claim]
    leases: dict[Key, float]
    deadline: float
    mails: MailBatch
    parent_mails: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    """(activity, recipient) → kind → Message-ID of mails sent, for follow-ups to answer."""
    finished: set[Key] = field(default_factory=set)


class _Lost(Exception):
    """Another instance holds the key now, or sent it: this one must not send it."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim


class Sender:
    """Claim (or renew), build, send with retries, record: one notification at a time."""

    def __init__(
        self,
        config: DeliveryConfig,
        ledger: Ledger,
        mailer: Mailer,
        outcomes: Outcomes,
        metrics: Metrics,
        stopping: asyncio.Event,
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._mailer = mailer
        self._outcomes = outcomes
        self._metrics = metrics
        self._stopping = stopping

    async def deliver(
        self, n: Notification, ids: Ids, record: Record, batch: Batch
    ) -> Failure | None:
        """Send `n` unless it was sent; the failure to dead-letter, if any."""
        key = n.key
        if key in batch.sent:
            self._outcomes.duplicate(n, ids)
            return None
        claim = batch.claims.get(key, Claim.HELD)
        if claim is Claim.HELD:
            claim = await self._wait_for_claim(n, ids, batch)
        if claim is Claim.SENT:
            batch.sent.add(key)
            self._outcomes.duplicate(n, ids)
            return None
        msg_id = message_id(n, self._config.domain)
        if claim is Claim.THROTTLED:
            failure = Failure.of(
                Stage.THROTTLED,
                f"{n.kind.value}: over {self._config.recipient_limit} mails an hour to one address",
            )
            await self._outcomes.throttled(n, ids, msg_id, failure)
            batch.finished.add(key)
            return failure
        built = await self._build(n, record, batch)
        if isinstance(built, NotBuilt):
            failure = Failure.of(built.failure.stage, f"{n.kind.value}: {built.failure.reason}")
            await self._outcomes.failed(n, ids, msg_id, failure)
            batch.finished.add(key)
            return failure
        self._metrics.rendered(built.render_seconds)
        try:
            refused = await self._send(n, ids, msg_id, built.data, batch)
        except _Lost as lost:
            if lost.claim is Claim.SENT:
                batch.sent.add(key)
                self._outcomes.duplicate(n, ids)
                return None
            raise RetryLater from None  # held elsewhere: whoever owns the record sends it
        batch.finished.add(key)
        if refused is None:
            batch.sent.add(key)
            batch.parent_mails.setdefault((n.activity_id, key.recipient), {})[n.kind.value] = msg_id
        return refused

    async def _send(
        self, n: Notification, ids: Ids, msg_id: str, data: bytes, batch: Batch
    ) -> Failure | None:
        key = n.key
        attempt = 0
        lease_end = 0.0

        async def ready() -> None:
            # With a connection in hand, so that waiting for one does not eat the lease:
            # at least half of it is left for the transaction (bounded by the SMTP
            # timeout, at most half the lease) and for recording the mail afterwards.
            nonlocal lease_end
            lease_end = await self._lease(n, ids, batch)

        with self._metrics.in_flight():
            while True:
                try:
                    await self._mailer.send(
                        self._config.envelope_from,
                        n.recipient.email,
                        data,
                        may_finish=lambda: time.monotonic() < lease_end,
                        ready=ready,
                    )
                    break
                except PermanentSmtpError as exc:
                    failure = Failure.of(Stage.SMTP, f"{n.kind.value}: {exc}")
                    await self._outcomes.failed(n, ids, msg_id, failure)
                    return failure
                except TransientSmtpError as exc:
                    self._outcomes.transient(n, ids, attempt, exc.code)
                    await self.backoff(attempt, batch.deadline)
                    attempt += 1
                except Withheld:
                    # The lease ran out during the transaction: renew it (or learn that
                    # another instance took over) before trying again.
                    batch.leases[key] = 0.0
        await self._outcomes.sent(n, ids, msg_id)
        return None

    async def _lease(self, n: Notification, ids: Ids, batch: Batch) -> float:
        """Until when this instance may send `n`: renewed once half its lease is gone."""
        key = n.key
        lease = self._config.lease_seconds
        end = batch.leases.get(key, 0.0)
        if time.monotonic() < end - lease / 2:
            return end
        started = time.monotonic()
        # A renewal is not counted against the recipient's limit a second time.
        claims = await self._ledger.claim(
            [ClaimRequest(key, n.ticket_id, ids.event_id)], self._config.owner, lease, 0
        )
        claim = claims.get(key, Claim.HELD)
        if claim is not Claim.WON:
            batch.leases.pop(key, None)
            raise _Lost(claim)
        batch.leases[key] = started + lease
        return batch.leases[key]

    async def _wait_for_claim(self, n: Notification, ids: Ids, batch: Batch) -> Claim:
        """Another instance holds `n` (it stalled, or has just lost the partition): wait
        for its lease to end or its mail to be recorded, within the retry budget."""
        key = n.key
        attempt = 0
        while True:
            await self.backoff(attempt, batch.deadline)
            attempt += 1
            started = time.monotonic()
            claims = await self._ledger.claim(
                [ClaimRequest(key, n.ticket_id, ids.event_id)],
                self._config.owner,
                self._config.lease_seconds,
                self._config.recipient_limit,
            )
            claim = claims.get(key, Claim.HELD)
            if claim is Claim.WON:
                batch.leases[key] = started + self._config.lease_seconds
            if claim is not Claim.HELD:
                return claim

    async def _build(self, n: Notification, record: Record, batch: Batch) -> Outcome:
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
                await self.backoff(attempt, batch.deadline)
                attempt += 1
                outcome = await batch.mails.rebuild(n, outcome)
        except WorkerLost:
            raise RetryLater from None
        return outcome

    async def backoff(self, attempt: int, deadline: float) -> None:
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
