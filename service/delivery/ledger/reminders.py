"""The reminders table's statements and rows, shared by both backends (`?` placeholders)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.delivery.ledger import ReminderRow

REMINDER_COLUMNS = "activity_id, kind, ticket_id, moment, sequence, state, version, payload"

UPSERT_REMINDER = (
    "INSERT INTO reminders (activity_id, kind, ticket_id, moment, sequence, state, version,"
    " payload, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (activity_id, kind) DO UPDATE SET ticket_id=excluded.ticket_id,"
    " moment=excluded.moment, sequence=excluded.sequence, state=excluded.state,"
    " version=excluded.version, payload=excluded.payload, updated_at=excluded.updated_at,"
    # A moved or cancelled reminder is nobody's any more: its next moment is free to take.
    " owner=NULL, claimed_until=NULL"
)

# Only the reminder that was taken: an event may have moved or cancelled it meanwhile.
FINISH_REMINDER = (
    "UPDATE reminders SET state=?, payload=NULL, owner=NULL, claimed_until=NULL,"
    " updated_at=? WHERE activity_id=? AND kind=? AND moment=? AND state='scheduled'"
)


def reminder_of(row: Sequence[Any]) -> ReminderRow:
    activity_id, kind, ticket_id, moment, sequence, state, version, payload = row
    return ReminderRow(
        str(activity_id),
        str(kind),
        None if ticket_id is None else str(ticket_id),
        float(moment),
        int(sequence),
        str(state),
        float(version),
        None if payload is None else str(payload),
    )


def reminder_params(r: ReminderRow, now: float) -> tuple[Any, ...]:
    return (
        r.activity_id,
        r.kind,
        r.ticket_id,
        r.moment,
        r.sequence,
        r.state,
        r.version,
        r.payload,
        now,
    )


def finish_params(r: ReminderRow, state: str, now: float) -> tuple[Any, ...]:
    return (state, now, r.activity_id, r.kind, r.moment)
