"""Between values and rows: parameters, row readers and the SQL both backends share.

SQL here uses `?` placeholders (sqlite3); the PostgreSQL ledger turns them into `%s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.delivery.ledger import (
    DeadLetter,
    Delivery,
    DeliveryQuery,
    Entry,
    Key,
    Status,
    one_line,
)
from service.delivery.ledger.claims import Grant, Row
from service.delivery.ledger.tickets import Ticket

Write = Entry | Ticket
"""What goes through the group commit."""

KEY_MATCH = "activity_id=? AND kind=? AND recipient=? AND moment=?"

# Each deletes at most `batch_size` (second parameter) rows older than the first; a prune
# runs each until it deletes fewer, one short transaction per batch.
PRUNE = (
    "DELETE FROM deliveries WHERE (activity_id, kind, recipient, moment) IN"
    " (SELECT activity_id, kind, recipient, moment FROM deliveries WHERE at < ? LIMIT ?)",
    'DELETE FROM dead_letters WHERE (topic, partition, "offset") IN'
    ' (SELECT topic, partition, "offset" FROM dead_letters WHERE at < ? LIMIT ?)',
    "DELETE FROM reminders WHERE (activity_id, kind) IN (SELECT activity_id, kind"
    " FROM reminders WHERE state <> 'scheduled' AND updated_at < ? LIMIT ?)",
    "DELETE FROM tickets WHERE ticket_id IN (SELECT ticket_id FROM tickets WHERE at < ? LIMIT ?)",
)

DELIVERY_COLUMNS = (
    "activity_id, kind, recipient, moment, status, ticket_id, event_id, message_id, stage,"
    " reason, created_at, at"
)


def newest_writes(items: Sequence[Write]) -> tuple[list[Entry], list[Ticket]]:
    """One entry per key (a `sent` wins, else the last) and one reference per ticket.

    A PostgreSQL upsert may not touch one row twice in a statement, and the outcome is
    the same: `sent` is never overwritten.
    """
    entries: dict[Key, Entry] = {}
    tickets: dict[str, Ticket] = {}
    for item in items:
        if isinstance(item, Ticket):
            tickets[item.ticket_id] = item
        else:
            before = entries.get(item.key)
            if before is None or before.status is not Status.SENT:
                entries[item.key] = item
    return list(entries.values()), list(tickets.values())


def entry_params(e: Entry, now: float) -> tuple[Any, ...]:
    return (
        *e.key,
        e.ticket_id,
        e.event_id,
        Status(e.status).value,
        e.message_id,
        e.stage,
        one_line(e.reason),
        now,
        now,
    )


def claim_params(g: Grant, owner: str, now: float, lease: float) -> tuple[Any, ...]:
    prior = g.prior_status.value if g.prior_status is not None else None
    r = g.request
    return (*r.key, r.ticket_id, r.event_id, owner, now + lease, prior, g.prior_at, now, now)


def row_of(found: Sequence[Any]) -> Row:
    """From (status, owner, claimed_until, at, prior_status, prior_at)."""
    status, owner, until, at, prior, prior_at = found
    return Row(Status(status), owner, until, at, Status(prior) if prior else None, prior_at)


def delivery_of(r: Sequence[Any]) -> Delivery:
    """From a row of DELIVERY_COLUMNS."""
    return Delivery(
        key=Key(r[0], r[1], r[2], r[3]),
        status=Status(r[4]),
        ticket_id=r[5],
        event_id=r[6],
        message_id=r[7],
        stage=r[8],
        reason=r[9],
        created_at=float(r[10]),
        at=float(r[11]),
    )


def dead_letter_reason(letter: DeadLetter) -> str | None:
    return one_line(letter.reason)


def audit_sql(query: DeliveryQuery) -> tuple[str, list[Any]]:
    """SELECT of DELIVERY_COLUMNS for `query`, newest first."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("ticket_id", query.ticket),
        ("activity_id", query.activity),
        ("recipient", query.recipient),
        ("status", Status(query.status).value if query.status else None),
    ):
        if value is not None:
            where.append(f"{column}=?")
            params.append(value)
    if query.since is not None:
        where.append("at >= ?")
        params.append(query.since)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    params.append(max(0, query.limit))
    return f"SELECT {DELIVERY_COLUMNS} FROM deliveries{clause} ORDER BY at DESC LIMIT ?", params
