"""Every outcome of a notification told once, in one place: the audit row, a metric, a log line.

Rows go to the ledger (contract section 8: every status with its ticket), metrics count by
kind and outcome, and log lines carry ids and kinds only, never texts or addresses.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from service.core.backoff import backoff_delay
from service.core.failures import Failure
from service.core.routing import Notification, Unresolved
from service.delivery.dead_letters import RetryLater
from service.delivery.ledger import Entry, Key, Ledger, LedgerUnavailable, Status
from service.runtime.metrics import Metrics

log = logging.getLogger("service.delivery.dispatch")

# A mail the SMTP server accepted must be recorded, or it is sent again after a rewind:
# a ledger blip gets these tries (about 15 s in all) before the batch gives up.
RECORD_TRIES = 6


@dataclass(frozen=True, slots=True)
class Ids:
    """What every log line and audit row of one event carries."""

    event_id: str
    activity_id: str
    ticket_id: str
    event_time: datetime | None = None

    def fields(self, **more: str) -> dict[str, str]:
        return {
            "event_id": self.event_id,
            "activity_id": self.activity_id,
            "ticket_id": self.ticket_id,
            **more,
        }


class Outcomes:
    """Records, counts and logs each outcome; the dispatcher decides, this tells."""

    def __init__(self, ledger: Ledger, metrics: Metrics) -> None:
        self._ledger = ledger
        self._metrics = metrics

    async def _record(self, entry: Entry) -> None:
        await self._ledger.record(entry)

    def _entry(
        self,
        n: Notification,
        ids: Ids,
        status: Status,
        message_id: str | None = None,
        failure: Failure | None = None,
        reason: str | None = None,
    ) -> Entry:
        return Entry(
            n.key,
            status,
            message_id,
            ticket_id=n.ticket_id,
            event_id=ids.event_id,
            stage=failure.stage.value if failure else None,
            reason=failure.reason if failure else reason,
        )

    async def sent(self, n: Notification, ids: Ids, message_id: str) -> None:
        """The server accepted the mail: record it, retrying a ledger blip in process."""
        entry = self._entry(n, ids, Status.SENT, message_id)
        for attempt in range(RECORD_TRIES):
            try:
                await self._record(entry)
                break
            except LedgerUnavailable:
                if attempt == RECORD_TRIES - 1:
                    # Rewound, this mail is sent again with its Message-ID: the crash
                    # window of contract section 2, widened by the outage.
                    log.error("sent mail not recorded", extra=ids.fields(kind=n.kind.value))
                    raise RetryLater from None
                await asyncio.sleep(backoff_delay(attempt, 0.5, 5.0))
        self._metrics.notification(n.kind.value, "sent")
        self._metrics.delivered(ids.event_time)
        log.info(
            "sent",
            extra=ids.fields(kind=n.kind.value, outcome="sent", message_id=message_id),
        )

    async def failed(self, n: Notification, ids: Ids, message_id: str, failure: Failure) -> None:
        await self._record(self._entry(n, ids, Status.FAILED, message_id, failure))
        self._metrics.notification(n.kind.value, "failed_permanent")
        log.error(
            "permanent failure",
            extra=ids.fields(
                kind=n.kind.value, outcome="failed_permanent", stage=failure.stage.value
            ),
        )

    async def throttled(self, n: Notification, ids: Ids, message_id: str, failure: Failure) -> None:
        await self._record(self._entry(n, ids, Status.THROTTLED, message_id, failure))
        self._metrics.notification(n.kind.value, "throttled")
        log.warning(
            "recipient over its hourly limit: held back",
            extra=ids.fields(kind=n.kind.value, outcome="throttled"),
        )

    async def withheld(self, n: Notification, ids: Ids) -> None:
        reason = "personal data: suppliers may not receive it"
        await self._record(self._entry(n, ids, Status.WITHHELD, reason=reason))
        self._metrics.notification(n.kind.value, "withheld")
        log.info(
            "supplier mail withheld: personal data",
            extra=ids.fields(kind=n.kind.value, outcome="withheld"),
        )

    async def unresolved(self, u: Unresolved, ids: Ids) -> None:
        # The row carries the token in `recipient` (contract section 8), never an address
        # of someone else's: the token is what the activity said.
        token = u.token[:200]
        reason = (
            "no customer known for this ticket"
            if u.field == "customer"
            else f"{u.field}: not in the directory"
        )
        key = Key(ids.activity_id, u.kind.value, token.lower())
        await self._record(
            Entry(
                key,
                Status.UNRESOLVED,
                ticket_id=ids.ticket_id,
                event_id=ids.event_id,
                reason=reason,
            )
        )
        self._metrics.notification("unknown", "unresolved")
        log.warning(
            "unresolved recipient",
            extra=ids.fields(outcome="unresolved", field=u.field, token=token[:100]),
        )

    async def expired(self, ns: list[Notification], ids: Ids, reason: str) -> None:
        """History (section 10) or a stale reminder: recorded, counted, mailed to nobody."""
        # Together, so they share the ledger's group commit.
        await asyncio.gather(
            *(self._record(self._entry(n, ids, Status.EXPIRED, reason=reason)) for n in ns)
        )
        for n in ns:
            self._metrics.notification(n.kind.value, "expired")
        log.info(
            "expired, not mailed",
            extra=ids.fields(outcome="expired", reason=reason, notifications=str(len(ns))),
        )

    def duplicate(self, n: Notification, ids: Ids) -> None:
        self._metrics.notification(n.kind.value, "skipped_duplicate")
        log.info("already sent", extra=ids.fields(kind=n.kind.value, outcome="skipped_duplicate"))

    def transient(self, n: Notification, ids: Ids, attempt: int, code: int | None) -> None:
        self._metrics.notification(n.kind.value, "failed_transient")
        # The server's reply text may quote the address: log its code only.
        log.warning(
            "transient smtp failure, retrying",
            extra={
                **ids.fields(kind=n.kind.value, outcome="failed_transient"),
                "attempt": attempt,
                "smtp_code": code,
            },
        )
