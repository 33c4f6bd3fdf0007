"""What the records (or due reminders) of one batch share: one look into the ledger for
what was sent and what the parents mailed, one claim for the rest, one MailBatch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from service.core.events import ActivityEvent
from service.core.routing import Kind, Notification, RoutingResult
from service.delivery.build import MailBuilder
from service.delivery.config import DeliveryConfig
from service.delivery.ledger import (
    BatchFacts,
    BatchQuery,
    Claim,
    ClaimRequest,
    Key,
    Ledger,
    ReminderRow,
    Where,
)
from service.delivery.outcomes import Ids
from service.delivery.sending import Batch


@dataclass(frozen=True, slots=True)
class Routed:
    """A record that parsed, with what routing made of it."""

    event: ActivityEvent
    result: RoutingResult
    ids: Ids
    expired: str | None = None  # why it mails nobody (history, too old), if so
    released: bool = False  # replayed from the `throttled` dead letters
    late_reminders: tuple[Notification, ...] = ()  # too late when read: recorded expired


class BatchOpener:
    """Opens and closes the Batch that a set of routed records is served in."""

    def __init__(self, config: DeliveryConfig, ledger: Ledger, builder: MailBuilder) -> None:
        self._config = config
        self._ledger = ledger
        self._builder = builder

    async def open(
        self,
        live: list[Routed],
        facts: BatchFacts | None = None,
        reminders: Sequence[ReminderRow] = (),
    ) -> Batch:
        """The batch, claimed; `facts` if its look-ups were made already (`query`), and
        `reminders` to store in the claim's transaction."""
        if facts is None:
            # Due reminders: their sent mails and parents only (their rows are in hand).
            facts = await self._ledger.look_up(replace(self.query([], live), activities=()))
        sent, parents = facts.sent, facts.sent_mails
        unsent = [
            answering(n, parents)
            for item in live
            for n in item.result.notifications
            if n.key not in sent
        ]
        # The workers start on the mails while the claims are asked for: building is pure,
        # and a mail whose claim is lost is dropped unsent with the batch.
        mails = self._builder.batch(unsent)
        try:
            # Ticket references (for the audit) go in beside the claims, not after them.
            (claims, claimed_at), _ = await asyncio.gather(
                self._claim(live, sent, reminders), self._record_tickets(live)
            )
        except BaseException:
            await mails.close()
            raise
        return Batch(
            sent=sent,
            claims=claims,
            leases=dict.fromkeys(
                (k for k, c in claims.items() if c is Claim.WON),
                claimed_at + self._config.lease_seconds,
            ),
            deadline=time.monotonic() + self._config.retry_budget,
            mails=mails,
            parent_mails=parents,
        )

    async def close(self, batch: Batch) -> None:
        await batch.mails.close()
        await self._release(batch)

    @staticmethod
    def query(records: Sequence[Where], routed: Sequence[Routed]) -> BatchQuery:
        """Everything a batch of these records asks the ledger before it is opened: their
        dead letters, their activities' reminders, which mails were sent, and what the
        follow-ups' parents mailed (for records that turn out dead-lettered too: a few
        rows more, one look instead of four)."""
        live = [item for item in routed if not item.expired]
        notes = [n for item in live for n in item.result.notifications]
        return BatchQuery(
            records=records,
            activities=sorted({item.event.data.activity.id for item in live}),
            keys=[n.key for n in notes],
            pairs=sorted(
                {(n.parent_activity_id, n.key.recipient) for n in notes if n.parent_activity_id}
            ),
        )

    async def _claim(
        self, live: list[Routed], sent: set[Key], reminders: Sequence[ReminderRow] = ()
    ) -> tuple[dict[Key, Claim], float]:
        """Claim the batch's unsent keys in one transaction; the claims and when they began."""
        requests: dict[Key, ClaimRequest] = {}
        for item in live:
            for n in item.result.notifications:
                key = n.key
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
            reminders,
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


def answering(n: Notification, mails: dict[tuple[str, str], dict[str, str]]) -> Notification:
    """`n`, answering the parent activity's mail to the same recipient if there is one
    (of the same kind if it got several)."""
    if not n.parent_activity_id:
        return n
    got = mails.get((n.parent_activity_id, n.key.recipient), {})
    parent = got.get(n.kind.value) or next((got[k.value] for k in Kind if k.value in got), None)
    return n.evolve(in_reply_to=parent) if parent != n.in_reply_to else n
