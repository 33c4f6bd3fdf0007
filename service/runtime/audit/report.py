"""What the audit shows of a ticket, in one shape for the API, the page and the command line."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.delivery.ledger import DeadLetter, Delivery, DeliveryQuery, Ledger

LIMIT_DEFAULT = 100
LIMIT_MAX = 1000


def iso_utc(epoch: float) -> str:
    """Epoch seconds as ISO 8601 UTC to the second, with Z: `2026-11-27T09:15:02Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reason_of(stage: str | None, reason: str | None) -> str | None:
    """The one-line reason shown, led by the failure's stage when the ledger has one."""
    if stage and reason:
        return reason if reason.startswith(f"{stage}:") else f"{stage}: {reason}"
    return reason or stage


def delivery_json(d: Delivery) -> dict[str, Any]:
    """One row of `GET /deliveries` (contract section 8)."""
    return {
        "ticket": d.ticket_id,
        "activity": d.key.activity_id,
        "kind": d.key.kind,
        "recipient": d.key.recipient,
        "status": d.status.value,
        "at": iso_utc(d.at),
        "message_id": d.message_id,
        "reason": reason_of(d.stage, d.reason),
    }


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    """One row of `GET /dead-letters`: where the record was, why, and when."""
    topic, partition, offset = letter.where
    return {
        "ticket": letter.ticket_id,
        "event": letter.event_id,
        "stage": letter.stage,
        "reason": letter.reason,
        "at": iso_utc(letter.at) if letter.at is not None else None,
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }


@dataclass(frozen=True, slots=True)
class TicketReport:
    """One ticket's notifications and dead letters, newest first."""

    ticket_id: str
    reference: str | None
    deliveries: list[Delivery]
    dead_letters: list[DeadLetter]

    @property
    def truncated(self) -> bool:
        """Whether the ticket has more notifications than were read."""
        return len(self.deliveries) >= LIMIT_MAX


async def find_tickets(ledger: Ledger, text: str) -> list[TicketReport]:
    """The tickets `text` names, as an id or as a reference (`T-1042`), with what the
    ledger holds of them; tickets with nothing recorded are left out."""
    text = text.strip()
    if not text:
        return []
    by_reference = await ledger.tickets_by_reference(text)

    async def report(ticket_id: str) -> TicketReport:
        deliveries, dead_letters = await asyncio.gather(
            ledger.deliveries(DeliveryQuery(ticket=ticket_id, limit=LIMIT_MAX)),
            ledger.dead_letters_of(ticket_id),
        )
        reference = text if ticket_id in by_reference else None
        return TicketReport(ticket_id, reference, deliveries, dead_letters)

    # A pooled (PostgreSQL) ledger answers these side by side.
    reports = await asyncio.gather(*(report(t) for t in dict.fromkeys([text, *by_reference])))
    return [r for r in reports if r.deliveries or r.dead_letters]
