"""Property test of the reminder rules: any sequence of created/updated events, read in any
order of their times while a controllable clock runs, sends each reminder at most once,
never after its cancellation, never too late, and never loses one still asked for."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.directory import Directory
from service.core.events import ActivityEvent
from service.core.reminders import (
    REMINDER_KINDS,
    Reminder,
    ReminderState,
    due_moments,
    moment_text,
    plan_reminders,
    reminder_notifications,
)
from service.core.routing import Kind

ZONE = ZoneInfo("Europe/Berlin")
DEFAULT_TIME = dt.time(9, 0)
MAX_LATE = dt.timedelta(hours=24)
# Two starting points two days before Berlin's DST changes of 2026 (29 March, 25 October).
STARTS = (
    dt.datetime(2026, 3, 27, 12, 0, tzinfo=dt.UTC),
    dt.datetime(2026, 10, 23, 12, 0, tzinfo=dt.UTC),
)
TIMES = (None, "00:30", "02:30", "09:00", "23:45")
DIRECTORY = Directory.from_mapping(
    {
        "departments": {"support": {"name": "Support", "members": ["alice", "bob"]}},
        "users": {
            "alice": {"name": "Alice Jones", "email": "alice@helpdesk.test"},
            "bob": {"name": "Bob Lee", "email": "bob@helpdesk.test"},
            "carol": {"name": "Carol Weber", "email": "carol@helpdesk.test"},
        },
    }
)

Key = tuple[str, str, str, str]


@dataclass(frozen=True)
class Step:
    """Time passes, then maybe one event is read (and maybe redelivered at once)."""

    advance: dt.timedelta
    followup: tuple[int, str | None, bool] | None  # (day offset, time, time without date)
    action: tuple[int, str | None, bool] | None
    action_taken: bool
    version_hours: int  # the event's `time`, hours from the start: any order
    redeliver: bool


@dataclass
class World:
    """The scheduler, the reminders table and the deliveries ledger, as the service keeps them."""

    now: dt.datetime
    rows: dict[Kind, Reminder] = field(default_factory=dict)
    payload: ActivityEvent | None = None  # the newest applied event, kept with the rows
    ledger: set[Key] = field(default_factory=set)
    sent: list[Key] = field(default_factory=list)
    newest: tuple[dt.datetime, dict[Kind, dt.datetime]] | None = None  # the oracle


SLOTS = st.tuples(st.integers(min_value=-3, max_value=4), st.sampled_from(TIMES), st.booleans())
STEPS = st.builds(
    Step,
    advance=st.integers(min_value=0, max_value=72 * 2).map(
        lambda half: dt.timedelta(minutes=30 * half)
    ),
    followup=st.none() | SLOTS,
    action=st.none() | SLOTS,
    action_taken=st.booleans(),
    version_hours=st.integers(min_value=-48, max_value=48),
    redeliver=st.booleans(),
)


def wire_dates(start: dt.datetime, step: Step) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, chosen in (("followup", step.followup), ("actionRequired", step.action)):
        if chosen is None:
            continue
        day, at, orphan = chosen
        if not (orphan and at is not None):  # an orphan time: the time without its date
            fields[f"{name}Date"] = (start.date() + dt.timedelta(days=day)).isoformat()
        if at is not None:
            fields[f"{name}Time"] = at
    if step.action_taken:
        fields["actionTakenDate"] = start.date().isoformat()
    return fields


def make_event(start: dt.datetime, step: Step) -> ActivityEvent:
    version = start + dt.timedelta(hours=step.version_hours)
    activity = {
        "id": "5001",
        "ticketID": "1042",
        "activityUser": "alice",
        "activityDepartments": "support",
        "activityUsers": "carol",
        **wire_dates(start, step),
    }
    return ActivityEvent.model_validate(
        {
            "specversion": "1.0",
            "id": f"e-{step.version_hours}",
            "source": "/t",
            "type": "ticketActivity.updated",
            "time": version.isoformat(),
            "data": {"activity": activity},
        }
    )


def fire_due(world: World, until: dt.datetime) -> None:
    """The scheduler: every scheduled reminder whose moment has come, in moment order."""
    due = sorted(
        (
            r
            for r in world.rows.values()
            if r.state is ReminderState.SCHEDULED and r.moment <= until
        ),
        key=lambda r: r.moment,
    )
    for row in due:
        fired_at = max(row.moment, world.now)
        assert world.newest is not None
        assert world.payload is not None
        # Never after a cancellation, never a moment an older event asked for.
        assert world.newest[1].get(row.kind) == row.moment
        # Never a moment more than max_late old.
        assert fired_at - row.moment <= MAX_LATE
        mails = reminder_notifications(world.payload, DIRECTORY, row.kind, row.moment, ZONE)
        for n in mails.notifications:
            assert n.moment == moment_text(row.moment)
            # The deliveries ledger keys (activity, kind, recipient, moment): a moment moved
            # away and back again is not mailed twice.
            if n.key not in world.ledger:
                world.ledger.add(n.key)
                world.sent.append(n.key)
        world.rows[row.kind] = replace(row, state=ReminderState.SENT)


def read(world: World, event: ActivityEvent, *, redelivery: bool) -> None:
    """The consumer: plan the event's reminders and store the result."""
    assert event.time is not None
    moments = due_moments(event.data.activity, ZONE, DEFAULT_TIME).moments
    changes = plan_reminders(
        world.rows.values(), moments, version=event.time, now=world.now, max_late=MAX_LATE
    )
    if redelivery:
        assert not any(c.store for c in changes), changes
    # The oracle, by the documented rule: the newest event by time wins, except that an
    # event that finds nothing stored and asks for nothing leaves nothing behind.
    counts = bool(world.rows) or bool(moments)
    if counts and (world.newest is None or event.time >= world.newest[0]):
        world.newest = (event.time, moments)
        world.payload = event
    for change in changes:
        if change.store:
            world.rows[change.kind] = change.reminder
    for row in world.rows.values():
        if row.state is ReminderState.SCHEDULED:
            assert world.now - row.moment <= MAX_LATE
    fire_due(world, world.now)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(STARTS), st.lists(STEPS, min_size=1, max_size=10))
def test_reminders_are_sent_at_most_once_never_cancelled_never_stale(
    start: dt.datetime, steps: list[Step]
) -> None:
    world = World(now=start)
    for step in steps:
        fire_due(world, world.now + step.advance)
        world.now += step.advance
        event = make_event(start, step)
        read(world, event, redelivery=False)
        if step.redeliver:
            read(world, event, redelivery=True)
    # Long after: every reminder the newest event still asks for was sent or expired.
    fire_due(world, world.now + dt.timedelta(days=30))
    assert len(world.sent) == len(set(world.sent))
    if world.newest is None:
        assert all(r.state is not ReminderState.SCHEDULED for r in world.rows.values())
        return
    for kind in REMINDER_KINDS:
        moment = world.newest[1].get(kind)
        row = world.rows.get(kind)
        if moment is None:
            assert row is None or row.state is not ReminderState.SCHEDULED
            continue
        assert row is not None
        assert row.moment == moment
        assert row.state in (ReminderState.SENT, ReminderState.EXPIRED)
        if row.state is ReminderState.SENT:
            keys = {k for k in world.ledger if k[1] == kind.value and k[3] == moment_text(moment)}
            assert {k[2] for k in keys} == {
                "alice@helpdesk.test",
                "bob@helpdesk.test",
                "carol@helpdesk.test",
            }
