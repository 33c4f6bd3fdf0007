"""Reminders on the delivery path: a batch plans its activities' reminders into the ledger,
durably, before any of its offsets can be committed; a due reminder becomes mail here.

The rules are the pure core's (`service.core.reminders`); this module plans the rows (the
batch's one look into the ledger reads them, its claim's transaction stores them), counts
what happened and turns a due row back into notifications.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.core.directory import Directory
from service.core.events import ActivityEvent, parse_event
from service.core.reminders import (
    Action,
    Change,
    Reminder,
    ReminderState,
    add_calendar,
    calendar_entries,
    due_moments,
    plan_reminders,
    reminder_notifications,
)
from service.core.routing import Kind, Notification, RoutingResult
from service.delivery.dead_letters import Record
from service.delivery.ledger import ReminderRow
from service.runtime.metrics import Metrics

log = logging.getLogger("service.delivery.reminders")

# The topic name a reminder's dead letter gives as its origin: it came from the ledger.
REMINDER_ORIGIN = "reminders"


@dataclass(frozen=True, slots=True)
class ReminderConfig:
    """NOTIFY_TIMEZONE, NOTIFY_REMINDER_DEFAULT_TIME and NOTIFY_REMINDER_MAX_LATE_HOURS."""

    zone: dt.tzinfo = dt.UTC
    default_time: dt.time = dt.time(9, 0)
    max_late: dt.timedelta = dt.timedelta(hours=24)


@dataclass(slots=True)
class Plan:
    """What one batch does to reminders: rows to store before it is served, the .ics entries
    of its staff mail, and the reminders that were already too late when read."""

    rows: dict[tuple[str, str], ReminderRow] = field(default_factory=dict)
    notifications: dict[int, tuple[Notification, ...]] = field(default_factory=dict)
    expired: dict[int, list[Notification]] = field(default_factory=dict)

    @property
    def earliest(self) -> float | None:
        """The nearest moment among the reminders this batch scheduled or moved."""
        moments = [r.moment for r in self.rows.values() if r.state == ReminderState.SCHEDULED]
        return min(moments, default=None)


@dataclass(frozen=True, slots=True)
class Planning:
    """One record's event, as planning needs it (`index` orders the batch's records)."""

    index: int
    event: ActivityEvent
    result: RoutingResult
    written: float | None  # the Kafka timestamp, epoch seconds


class Reminding:
    """Plans reminders from events, and rebuilds the mails of due ones."""

    def __init__(self, config: ReminderConfig, directory: Directory, metrics: Metrics) -> None:
        self._config = config
        self._directory = directory
        self._metrics = metrics

    def plan(self, items: Sequence[Planning], rows: Sequence[ReminderRow], now: float) -> Plan:
        """Apply each event, in order, to its activity's stored reminders (`rows`: those
        the ledger holds for the items' activities, read with the batch's other look-ups).
        The batch's claim stores the plan's rows, in its transaction."""
        plan = Plan()
        # Activity → kind → its stored reminder (this batch's changes included).
        stored: dict[str, dict[str, ReminderRow]] = defaultdict(dict)
        for r in rows:
            stored[r.activity_id][r.kind] = r
        clock = dt.datetime.fromtimestamp(now, dt.UTC)
        for item in sorted(items, key=lambda i: i.index):
            activity = item.event.data.activity
            due = due_moments(activity, self._config.zone, self._config.default_time)
            for name in due.orphan_times:
                self._metrics.reminder("orphaned")
                log.warning(
                    "a reminder time without its date schedules nothing",
                    extra={
                        "activity_id": activity.id,
                        "ticket_id": activity.ticket_id,
                        "field": name,
                    },
                )
            version = item.event.time or dt.datetime.fromtimestamp(item.written or now, dt.UTC)
            current = [_reminder(r) for r in stored[activity.id].values()]
            changes = plan_reminders(
                current, due.moments, version=version, now=clock, max_late=self._config.max_late
            )
            # The event as stored with its reminders: written only when one is stored.
            payload = (
                item.event.model_dump_json(by_alias=True)
                if any(change.store for change in changes)
                else ""
            )
            for change in changes:
                self._count(change)
                if change.store:
                    row = _row(change.reminder, activity.id, activity.ticket_id, payload)
                    stored[activity.id][change.kind.value] = plan.rows[
                        (activity.id, change.kind.value)
                    ] = row
                if change.action is Action.EXPIRE:
                    late = self.mails(item.event, change.kind, change.reminder.moment)
                    plan.expired.setdefault(item.index, []).extend(late.notifications)
            entries = calendar_entries(due, changes)
            if entries:
                plan.notifications[item.index] = add_calendar(item.result.notifications, entries)
        return plan

    def mails(self, event: ActivityEvent, kind: Kind, moment: dt.datetime) -> RoutingResult:
        return reminder_notifications(event, self._directory, kind, moment, self._config.zone)

    def due(self, row: ReminderRow) -> tuple[ActivityEvent, RoutingResult, Record]:
        """A taken row's event, its mails, and the record its dead letter would carry."""
        payload = (row.payload or "").encode()
        event = parse_event(payload, {})
        moment = dt.datetime.fromtimestamp(row.moment, dt.UTC)
        record = Record(
            # Unique per reminder and moment, so each failed one keeps its own audit row.
            topic=f"{REMINDER_ORIGIN}/{row.activity_id}/{row.kind}",
            partition=0,
            offset=int(row.moment),
            key=(row.ticket_id or event.data.activity.ticket_id).encode(),
            value=payload,
            headers=(("content-type", b"application/cloudevents+json"),),
        )
        return event, self.mails(event, Kind(row.kind), moment), record

    def _count(self, change: Change) -> None:
        names = {
            Action.SCHEDULE: "scheduled",
            Action.MOVE: "moved",
            Action.CANCEL: "cancelled",
            Action.EXPIRE: "expired",
        }
        if change.action in names:
            self._metrics.reminder(names[change.action])


def _reminder(row: ReminderRow) -> Reminder:
    return Reminder(
        Kind(row.kind),
        dt.datetime.fromtimestamp(row.moment, dt.UTC),
        row.sequence,
        ReminderState(row.state),
        dt.datetime.fromtimestamp(row.version, dt.UTC),
    )


def _row(r: Reminder, activity_id: str, ticket_id: str, payload: str) -> ReminderRow:
    return ReminderRow(
        activity_id,
        r.kind.value,
        ticket_id,
        r.moment.timestamp(),
        r.sequence,
        r.state.value,
        r.version.timestamp(),
        # Only a scheduled reminder needs its event; no text is kept longer than that.
        payload if r.state is ReminderState.SCHEDULED else None,
    )
