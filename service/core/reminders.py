"""Reminders (contract section 9): when an activity's dates fall due, and how each event
schedules, moves or cancels them. Pure: the clock and the zone come in as values."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from service.core.directory import Directory
from service.core.events import Activity, ActivityEvent
from service.core.routing import (
    CalendarEntry,
    Kind,
    Notification,
    RoutingResult,
    Unresolved,
    staff_content,
    staff_recipients,
    ticket_context,
)

REMINDER_KINDS = tuple(kind for kind in Kind if kind.reminder)

# Per reminder kind: the activity's date and time attributes, and the time's wire name.
_FIELDS = {
    Kind.FOLLOWUP_REMINDER: ("followup_date", "followup_time", "followupTime"),
    Kind.ACTION_REMINDER: ("action_required_date", "action_required_time", "actionRequiredTime"),
}


@dataclass(frozen=True, slots=True)
class DueMoments:
    """The reminders the newest version of an activity asks for.

    `moments` are aware and in UTC. `orphan_times` names the time fields set without their
    date ("followupTime", "actionRequiredTime"): they schedule nothing, and the caller logs
    them by ids and counts them; the activity's other mails go out as usual.
    """

    moments: dict[Kind, dt.datetime]
    orphan_times: tuple[str, ...] = ()


def due_moments(activity: Activity, zone: dt.tzinfo, default_time: dt.time) -> DueMoments:
    """The moment of each reminder `activity` asks for (see `resolve_moment`).

    An action reminder is asked for only while `actionTakenDate` is not set.
    """
    moments: dict[Kind, dt.datetime] = {}
    orphans: list[str] = []
    for kind, (date_field, time_field, time_name) in _FIELDS.items():
        day: dt.date | None = getattr(activity, date_field)
        at: dt.time | None = getattr(activity, time_field)
        if day is None:
            if at is not None:
                orphans.append(time_name)
            continue
        if kind is Kind.ACTION_REMINDER and activity.action_taken_date is not None:
            continue
        moments[kind] = resolve_moment(day, at, zone, default_time)
    return DueMoments(moments, tuple(orphans))


def resolve_moment(
    day: dt.date, at: dt.time | None, zone: dt.tzinfo, default_time: dt.time
) -> dt.datetime:
    """The instant (aware, UTC) a date field and its optional time field name.

    - A date-time with a UTC offset keeps its offset; a time field replaces its time of day.
    - Otherwise the wall time is local to `zone`: the time field's, else the date-time's
      own, else `default_time` for a plain date.
    - Wall times follow RFC 5545 §3.3.5, which is what zoneinfo does with fold=0: a time
      that occurs twice (autumn) is its first occurrence; a time that does not exist
      (spring) is read with the offset before the gap, so it lands as much later as the
      gap is long (02:30 in Europe/Berlin on the spring day is 03:30 CEST).
    """
    if isinstance(day, dt.datetime) and day.utcoffset() is not None:
        if at is not None:
            day = day.replace(hour=at.hour, minute=at.minute, second=at.second, microsecond=0)
        return day.astimezone(dt.UTC)
    if at is None:
        at = day.timetz() if isinstance(day, dt.datetime) else default_time
    wall = dt.datetime.combine(day, at.replace(tzinfo=None, fold=0), tzinfo=zone)
    return wall.astimezone(dt.UTC)


def moment_text(moment: dt.datetime) -> str:
    """The form a moment takes in keys and the ledger: ISO 8601 in UTC with a `Z`."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class ReminderState(StrEnum):
    """Where a stored reminder stands."""

    SCHEDULED = "scheduled"  # waiting for its moment
    SENT = "sent"  # its moment came and its mails went out (set by the scheduler)
    CANCELLED = "cancelled"  # the newest event no longer asks for it
    EXPIRED = "expired"  # too late when its event was read: recorded, never sent


@dataclass(frozen=True, slots=True)
class Reminder:
    """What is stored for one reminder kind of one activity (one row per activity and kind).

    `sequence` starts at 0 and grows by one whenever the moment moves or a cancelled
    reminder comes back; it is the SEQUENCE of the `.ics` entry. `version` is the time of
    the newest event applied to the activity's reminders: an older event changes nothing.
    """

    kind: Kind
    moment: dt.datetime
    sequence: int
    state: ReminderState
    version: dt.datetime


class Action(StrEnum):
    """What one event does to one reminder kind of its activity."""

    SCHEDULE = "schedule"  # a new reminder, or a cancelled one asked for again
    MOVE = "move"  # a new moment: sequence + 1
    CANCEL = "cancel"  # date cleared, or actionTakenDate set
    KEEP = "keep"  # the same moment (or nothing to undo): only the version advances
    EXPIRE = "expire"  # the moment is more than max_late old: record expired, never send
    STALE = "stale"  # the event is older than one already applied: nothing changes


@dataclass(frozen=True, slots=True)
class Change:
    """One reminder kind's outcome of planning: the action and the row to store."""

    kind: Kind
    action: Action
    reminder: Reminder  # to store from now on (STALE: what is stored, unchanged)
    previous: Reminder | None  # what was stored before

    @property
    def store(self) -> bool:
        """Whether the stored row must be written (KEEP writes only the newer version)."""
        return self.reminder != self.previous


def plan_reminders(
    stored: Iterable[Reminder],
    due: Mapping[Kind, dt.datetime],
    *,
    version: dt.datetime,
    now: dt.datetime,
    max_late: dt.timedelta,
) -> tuple[Change, ...]:
    """How one event changes its activity's reminders.

    `stored`: the activity's rows; `due`: the event's `DueMoments.moments`; `version`: the
    event's `time` (the Kafka timestamp when it has none), aware. An event older than the
    newest version stored for the activity is STALE for every kind; one of the same time
    is applied (a redelivery yields KEEP). A moment more than `max_late` before `now`
    expires (a moment exactly `max_late` old is still sent); a later one is scheduled, and
    one already past is due at once. A kind with neither a row nor a moment yields nothing.
    """
    # In UTC: Python never calls datetimes of two zones equal when one is a repeated wall
    # time (PEP 495), and a moment must equal itself whatever zone it was read in.
    version = version.astimezone(dt.UTC)
    rows = {
        r.kind: replace(r, moment=r.moment.astimezone(dt.UTC), version=r.version.astimezone(dt.UTC))
        for r in stored
    }
    newest = max((r.version for r in rows.values()), default=None)
    if newest is not None and version < newest:
        return tuple(Change(r.kind, Action.STALE, r, r) for r in rows.values())
    changes: list[Change] = []
    for kind in REMINDER_KINDS:
        row, wanted = rows.get(kind), due.get(kind)
        moment = wanted.astimezone(dt.UTC) if wanted is not None else None
        if moment is not None:
            changes.append(_asked(kind, row, moment, now - moment > max_late, version))
        elif row is not None:
            changes.append(_cleared(row, version))
    return tuple(changes)


def _cleared(row: Reminder, version: dt.datetime) -> Change:
    """The event asks for no reminder of this kind: a scheduled one is cancelled."""
    if row.state is ReminderState.SCHEDULED:
        return Change(
            row.kind,
            Action.CANCEL,
            replace(row, state=ReminderState.CANCELLED, version=version),
            row,
        )
    return Change(row.kind, Action.KEEP, replace(row, version=version), row)


def _asked(
    kind: Kind, row: Reminder | None, moment: dt.datetime, late: bool, version: dt.datetime
) -> Change:
    """The event asks for a reminder at `moment`."""
    state = ReminderState.EXPIRED if late else ReminderState.SCHEDULED
    if row is None:
        action = Action.EXPIRE if late else Action.SCHEDULE
        return Change(kind, action, Reminder(kind, moment, 0, state, version), None)
    if row.moment == moment and row.state is not ReminderState.CANCELLED:
        # The same reminder: never re-sent, never re-expired; a scheduled one that is now
        # too late expires, as the rule says for every event read.
        if row.state is ReminderState.SCHEDULED and late:
            return Change(kind, Action.EXPIRE, replace(row, state=state, version=version), row)
        return Change(kind, Action.KEEP, replace(row, version=version), row)
    moved = Action.MOVE if row.moment != moment else Action.SCHEDULE
    action = Action.EXPIRE if late else moved
    return Change(kind, action, Reminder(kind, moment, row.sequence + 1, state, version), row)


def calendar_entries(due: DueMoments, changes: Iterable[Change]) -> tuple[CalendarEntry, ...]:
    """The `.ics` entries of the event's staff mail: each due moment with its sequence."""
    sequences = {c.kind: c.reminder.sequence for c in changes}
    return tuple(
        CalendarEntry(kind, moment, sequences.get(kind, 0)) for kind, moment in due.moments.items()
    )


def add_calendar(
    notifications: Iterable[Notification], entries: tuple[CalendarEntry, ...]
) -> tuple[Notification, ...]:
    """The notifications with `entries` set on the staff ones (only staff mail carries .ics)."""
    return tuple(n.evolve(calendar=entries) if n.kind is Kind.STAFF else n for n in notifications)


def reminder_notifications(
    event: ActivityEvent, directory: Directory, kind: Kind, moment: dt.datetime, zone: dt.tzinfo
) -> RoutingResult:
    """The mails of one reminder that came due: to the author (when the directory knows
    them) and the activity's staff recipients, one per address; never the customer or a
    supplier. The content is staff mail's, with the due moment shown in `zone`.
    """
    if not kind.reminder:
        raise ValueError(f"not a reminder kind: {kind.value}")
    activity = event.data.activity
    unresolved: list[Unresolved] = []
    blank, _ = ticket_context(event, directory)
    content = staff_content(activity, blank, directory).evolve(
        kind=kind, moment=moment_text(moment)
    )
    local = moment.astimezone(zone)
    if kind is Kind.FOLLOWUP_REMINDER:
        content = content.evolve(followup=local, followup_time=None)
    else:
        content = content.evolve(action_required=local, action_required_time=None)
    recipients = staff_recipients(activity, directory, unresolved, with_author=True)
    return RoutingResult(
        tuple(content.evolve(recipient=r) for r in recipients),
        (),
        tuple(dict.fromkeys(unresolved)),
    )
