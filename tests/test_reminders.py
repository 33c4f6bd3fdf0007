"""Tests of service.core.reminders: due moments (zones, DST), the planner, and recipients."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from service.core.directory import Directory
from service.core.events import Activity, ActivityEvent
from service.core.reminders import (
    Action,
    Change,
    DueMoments,
    Reminder,
    ReminderState,
    add_calendar,
    calendar_entries,
    due_moments,
    moment_text,
    plan_reminders,
    reminder_notifications,
    resolve_moment,
)
from service.core.routing import CalendarEntry, Kind, RoutingPolicy, Unresolved, route

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
NINE = dt.time(9, 0)
FOLLOWUP, ACTION = Kind.FOLLOWUP_REMINDER, Kind.ACTION_REMINDER
DAY = dt.timedelta(hours=24)

DIRECTORY = Directory.from_mapping(
    {
        "departments": {"support": {"name": "Customer Support", "members": ["alice", "bob"]}},
        "users": {
            "alice": {"name": "Alice Jones", "email": "alice@helpdesk.test", "locale": "en"},
            "bob": {"name": "Bob Lee", "email": "Bob@Helpdesk.test", "locale": "de"},
            "carol": {"name": "Carol Weber", "email": "carol@helpdesk.test", "locale": "de"},
        },
        "suppliers": {"acme": {"name": "ACME Parts", "email": "orders@acme.test"}},
        "tickets": {
            "1042": {
                "reference": "T-1042",
                "subject": "Printer on floor 3 jams",
                "customer": {"name": "Dana Smith", "email": "dana@customer.test"},
            }
        },
    }
)


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def activity(**fields: Any) -> Activity:
    return Activity.model_validate({"id": "5001", "ticketID": "1042", **fields})


def event(**fields: Any) -> ActivityEvent:
    return ActivityEvent.model_validate(
        {
            "specversion": "1.0",
            "id": "e-1",
            "source": "/t",
            "type": "ticketActivity.created",
            "data": {"activity": activity(**fields).to_wire()},
        }
    )


def due(zone: dt.tzinfo = UTC, default: dt.time = NINE, **fields: Any) -> DueMoments:
    return due_moments(activity(**fields), zone, default)


class Clock:
    """A clock the test moves by hand: the planner never reads time itself."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def advance(self, delta: dt.timedelta) -> dt.datetime:
        self.now += delta
        return self.now


# --- due moments ------------------------------------------------------------------------


def test_a_date_without_time_is_the_default_time_in_utc_by_default() -> None:
    assert due(followupDate="2026-12-02").moments == {FOLLOWUP: utc(2026, 12, 2, 9, 0)}


def test_a_date_and_time_are_local_to_the_zone() -> None:
    winter = due(BERLIN, followupDate="2026-12-02", followupTime="08:00")
    summer = due(BERLIN, actionRequiredDate="2026-07-01", actionRequiredTime="14:30:15")
    assert winter.moments == {FOLLOWUP: utc(2026, 12, 2, 7, 0)}
    assert summer.moments == {ACTION: utc(2026, 7, 1, 12, 30, 15)}


def test_the_default_time_is_local_too() -> None:
    assert due(BERLIN, dt.time(7, 45), followupDate="2026-12-02").moments == {
        FOLLOWUP: utc(2026, 12, 2, 6, 45)
    }


def test_a_date_time_with_an_offset_keeps_it() -> None:
    moments = due(BERLIN, followupDate="2026-12-02T08:00:00-05:00").moments
    assert moments == {FOLLOWUP: utc(2026, 12, 2, 13, 0)}


def test_a_time_field_replaces_the_time_of_an_offset_date_time_in_that_offset() -> None:
    moments = due(BERLIN, followupDate="2026-12-02T00:00:00+05:30", followupTime="10:00").moments
    assert moments == {FOLLOWUP: utc(2026, 12, 2, 4, 30)}


def test_a_date_time_without_offset_is_local_and_a_time_field_wins() -> None:
    assert due(BERLIN, followupDate="2026-12-02T15:00").moments == {
        FOLLOWUP: utc(2026, 12, 2, 14, 0)
    }
    assert due(BERLIN, followupDate="2026-12-02T15:00", followupTime="08:00").moments == {
        FOLLOWUP: utc(2026, 12, 2, 7, 0)
    }


def test_both_reminders_and_no_action_reminder_once_action_is_taken() -> None:
    both = due(followupDate="2026-12-02", actionRequiredDate="2026-12-01")
    assert set(both.moments) == {FOLLOWUP, ACTION}
    taken = due(
        followupDate="2026-12-02", actionRequiredDate="2026-12-01", actionTakenDate="2026-11-30"
    )
    assert set(taken.moments) == {FOLLOWUP}
    assert taken.orphan_times == ()


def test_a_time_without_its_date_schedules_nothing_and_is_reported() -> None:
    result = due(followupTime="10:00", actionRequiredDate="2026-12-01")
    assert set(result.moments) == {ACTION}
    assert result.orphan_times == ("followupTime",)
    both = due(followupTime="10:00", actionRequiredTime="11:00")
    assert both.moments == {}
    assert both.orphan_times == ("followupTime", "actionRequiredTime")


def test_nothing_is_due_without_dates() -> None:
    assert due() == DueMoments({}, ())


# DST, Europe/Berlin 2026: clocks go 02:00 CET -> 03:00 CEST on 29 March, and
# 03:00 CEST -> 02:00 CET on 25 October. The rule is RFC 5545 §3.3.5 (zoneinfo fold=0).
@pytest.mark.parametrize(
    ("day", "at", "expected"),
    [
        # spring: before, inside and after the gap; 02:30 does not exist and reads as 03:30
        ("2026-03-29", "01:59", utc(2026, 3, 29, 0, 59)),
        ("2026-03-29", "02:00", utc(2026, 3, 29, 1, 0)),
        ("2026-03-29", "02:30", utc(2026, 3, 29, 1, 30)),
        ("2026-03-29", "03:00", utc(2026, 3, 29, 1, 0)),
        ("2026-03-29", "03:30", utc(2026, 3, 29, 1, 30)),
        # autumn: 02:30 happens twice and is its first occurrence (still CEST)
        ("2026-10-25", "01:59", utc(2026, 10, 24, 23, 59)),
        ("2026-10-25", "02:30", utc(2026, 10, 25, 0, 30)),
        ("2026-10-25", "03:00", utc(2026, 10, 25, 2, 0)),
    ],
)
def test_dst_in_berlin(day: str, at: str, expected: dt.datetime) -> None:
    assert due(BERLIN, followupDate=day, followupTime=at).moments[FOLLOWUP] == expected


def test_dst_matches_the_examples_of_rfc_5545() -> None:
    # RFC 5545 §3.3.5: TZID=America/New_York:20070311T023000 is 03:30 EDT, and
    # TZID=America/New_York:20071104T013000 is 01:30 EDT (the first occurrence).
    gap = resolve_moment(dt.date(2007, 3, 11), dt.time(2, 30), NEW_YORK, NINE)
    twice = resolve_moment(dt.date(2007, 11, 4), dt.time(1, 30), NEW_YORK, NINE)
    assert gap == utc(2007, 3, 11, 7, 30)
    assert gap.astimezone(NEW_YORK).strftime("%H:%M %Z") == "03:30 EDT"
    assert twice == utc(2007, 11, 4, 5, 30)
    assert twice.astimezone(NEW_YORK).strftime("%H:%M %Z") == "01:30 EDT"


def test_a_default_time_inside_the_gap_follows_the_same_rule() -> None:
    moments = due(BERLIN, dt.time(2, 30), followupDate="2026-03-29").moments
    assert moments[FOLLOWUP].astimezone(BERLIN).strftime("%H:%M %Z") == "03:30 CEST"


def test_moment_text_is_iso_utc_with_z() -> None:
    assert moment_text(dt.datetime(2026, 12, 2, 9, 0, tzinfo=BERLIN)) == "2026-12-02T08:00:00Z"
    assert moment_text(utc(2026, 12, 2, 8, 0, 0, 5)) == "2026-12-02T08:00:00.000005Z"


# --- the planner --------------------------------------------------------------------------

MAX_LATE = dt.timedelta(hours=24)
T0 = utc(2026, 11, 27, 9, 0)
M1, M2 = utc(2026, 12, 2, 8, 0), utc(2026, 12, 3, 8, 0)


def plan(
    stored: list[Reminder],
    moments: dict[Kind, dt.datetime],
    version: dt.datetime,
    now: dt.datetime = T0,
) -> dict[Kind, Change]:
    changes = plan_reminders(stored, moments, version=version, now=now, max_late=MAX_LATE)
    assert len({c.kind for c in changes}) == len(changes)
    return {c.kind: c for c in changes}


def applied(rows: list[Reminder], changes: dict[Kind, Change]) -> list[Reminder]:
    by_kind = {r.kind: r for r in rows}
    by_kind.update({kind: c.reminder for kind, c in changes.items() if c.store})
    return list(by_kind.values())


def test_a_new_date_is_scheduled_at_sequence_zero() -> None:
    changes = plan([], {FOLLOWUP: M1, ACTION: M2}, version=T0)
    assert changes[FOLLOWUP].action is Action.SCHEDULE
    assert changes[FOLLOWUP].reminder == Reminder(FOLLOWUP, M1, 0, ReminderState.SCHEDULED, T0)
    assert changes[ACTION].reminder.moment == M2
    assert changes[FOLLOWUP].previous is None
    assert changes[FOLLOWUP].store


def test_no_dates_and_nothing_stored_plans_nothing() -> None:
    assert plan([], {}, version=T0) == {}


def test_a_redelivered_event_keeps_everything_and_writes_nothing() -> None:
    rows = applied([], plan([], {FOLLOWUP: M1}, version=T0))
    again = plan(rows, {FOLLOWUP: M1}, version=T0)
    assert again[FOLLOWUP].action is Action.KEEP
    assert not again[FOLLOWUP].store


def test_a_new_date_moves_the_reminder_and_grows_the_sequence() -> None:
    rows = applied([], plan([], {FOLLOWUP: M1}, version=T0))
    later = T0 + dt.timedelta(hours=1)
    moved = plan(rows, {FOLLOWUP: M2}, version=later)[FOLLOWUP]
    assert moved.action is Action.MOVE
    assert moved.reminder == Reminder(FOLLOWUP, M2, 1, ReminderState.SCHEDULED, later)
    back = plan(applied(rows, {FOLLOWUP: moved}), {FOLLOWUP: M1}, version=later + DAY)[FOLLOWUP]
    assert (back.action, back.reminder.sequence) == (Action.MOVE, 2)


def test_a_cleared_date_or_action_taken_cancels() -> None:
    rows = applied([], plan([], {FOLLOWUP: M1, ACTION: M2}, version=T0))
    # actionTakenDate set: due_moments no longer asks for the action reminder.
    taken = due(
        followupDate="2026-12-02",
        followupTime="08:00",
        actionRequiredDate="2026-12-03",
        actionRequiredTime="08:00",
        actionTakenDate="2026-11-28",
    )
    changes = plan(rows, taken.moments, version=T0 + DAY)
    assert changes[FOLLOWUP].action is Action.KEEP
    assert changes[ACTION].action is Action.CANCEL
    assert changes[ACTION].reminder.state is ReminderState.CANCELLED
    assert changes[ACTION].reminder.moment == M2
    cleared = plan(rows, {}, version=T0 + DAY)
    assert {c.action for c in cleared.values()} == {Action.CANCEL}


def test_a_cancelled_reminder_asked_for_again_is_scheduled_with_a_new_sequence() -> None:
    rows = applied([], plan([], {ACTION: M1}, version=T0))
    rows = applied(rows, plan(rows, {}, version=T0 + DAY))
    again = plan(rows, {ACTION: M1}, version=T0 + 2 * DAY)[ACTION]
    assert again.action is Action.SCHEDULE
    assert again.reminder == Reminder(ACTION, M1, 1, ReminderState.SCHEDULED, T0 + 2 * DAY)


def test_a_sent_reminder_is_never_scheduled_again_for_its_moment() -> None:
    sent = Reminder(FOLLOWUP, M1, 0, ReminderState.SENT, T0)
    same = plan([sent], {FOLLOWUP: M1}, version=T0 + DAY, now=M1 + DAY)[FOLLOWUP]
    assert same.action is Action.KEEP
    assert same.reminder.state is ReminderState.SENT
    cleared = plan([sent], {}, version=T0 + DAY)[FOLLOWUP]
    assert (cleared.action, cleared.reminder.state) == (Action.KEEP, ReminderState.SENT)
    moved = plan([sent], {FOLLOWUP: M2}, version=T0 + DAY)[FOLLOWUP]
    assert (moved.action, moved.reminder.state) == (Action.MOVE, ReminderState.SCHEDULED)


@pytest.mark.parametrize(
    ("late", "action"),
    [
        (dt.timedelta(0), Action.SCHEDULE),
        (dt.timedelta(hours=23, minutes=59), Action.SCHEDULE),
        (MAX_LATE, Action.SCHEDULE),  # exactly max_late: still sent, at once
        (MAX_LATE + dt.timedelta(seconds=1), Action.EXPIRE),
        (dt.timedelta(days=400), Action.EXPIRE),
    ],
)
def test_late_moments_are_due_at_once_or_expire(late: dt.timedelta, action: Action) -> None:
    clock = Clock(M1)
    change = plan([], {FOLLOWUP: M1}, version=T0, now=clock.advance(late))[FOLLOWUP]
    assert change.action is action
    expected = ReminderState.EXPIRED if action is Action.EXPIRE else ReminderState.SCHEDULED
    assert change.reminder.state is expected
    assert change.reminder.moment == M1


def test_a_move_to_a_moment_too_old_expires_it() -> None:
    rows = applied([], plan([], {FOLLOWUP: M2}, version=T0))
    change = plan(rows, {FOLLOWUP: M1 - 3 * DAY}, version=T0 + DAY, now=M2)[FOLLOWUP]
    assert change.action is Action.EXPIRE
    assert change.reminder == Reminder(FOLLOWUP, M1 - 3 * DAY, 1, ReminderState.EXPIRED, T0 + DAY)


def test_a_scheduled_reminder_too_old_when_its_event_is_read_again_expires() -> None:
    rows = applied([], plan([], {FOLLOWUP: M1}, version=T0))
    change = plan(rows, {FOLLOWUP: M1}, version=T0, now=M1 + 2 * DAY)[FOLLOWUP]
    assert (change.action, change.reminder.state) == (Action.EXPIRE, ReminderState.EXPIRED)
    expired = applied(rows, {FOLLOWUP: change})
    assert (
        plan(expired, {FOLLOWUP: M1}, version=T0, now=M1 + 3 * DAY)[FOLLOWUP].action is Action.KEEP
    )


def test_an_older_event_changes_nothing() -> None:
    newer = T0 + DAY
    rows = applied([], plan([], {FOLLOWUP: M2}, version=newer))
    stale = plan(rows, {FOLLOWUP: M1, ACTION: M1}, version=T0)
    assert set(stale) == {FOLLOWUP}  # the action kind has no row: nothing to report
    assert stale[FOLLOWUP].action is Action.STALE
    assert stale[FOLLOWUP].reminder == rows[0]
    assert not stale[FOLLOWUP].store


def test_an_older_event_does_not_undo_a_newer_cancellation() -> None:
    rows = applied([], plan([], {ACTION: M1}, version=T0))
    rows = applied(rows, plan(rows, {}, version=T0 + 2 * DAY))
    stale = plan(rows, {ACTION: M2}, version=T0 + DAY)
    assert stale[ACTION].action is Action.STALE
    assert stale[ACTION].reminder.state is ReminderState.CANCELLED


def test_ordering_is_per_activity_across_kinds() -> None:
    # The follow-up row was written by a newer event; an older event may not add an action.
    rows = applied([], plan([], {FOLLOWUP: M1}, version=T0 + DAY))
    stale = plan(rows, {FOLLOWUP: M1, ACTION: M2}, version=T0)
    assert [c.action for c in stale.values()] == [Action.STALE]


def test_an_event_without_reminders_leaves_no_row_so_an_older_one_still_schedules() -> None:
    # The documented limit: nothing is stored for an activity that never asked for a
    # reminder, so an older event that asks for one, read after it, schedules it.
    assert plan([], {}, version=T0 + DAY) == {}
    assert plan([], {FOLLOWUP: M1}, version=T0)[FOLLOWUP].action is Action.SCHEDULE


def test_the_version_of_an_event_without_a_time_zone_compares_as_an_instant() -> None:
    rows = applied([], plan([], {FOLLOWUP: M1}, version=utc(2026, 11, 27, 9, 0)))
    same_instant = dt.datetime(2026, 11, 27, 10, 0, tzinfo=BERLIN)
    assert plan(rows, {FOLLOWUP: M1}, version=same_instant)[FOLLOWUP].action is Action.KEEP


# --- calendar entries ----------------------------------------------------------------------


def test_calendar_entries_carry_the_planned_sequence() -> None:
    rows = applied([], plan([], {FOLLOWUP: M1, ACTION: M1}, version=T0))
    moments = DueMoments({FOLLOWUP: M2, ACTION: M1})
    changes = plan_reminders(rows, moments.moments, version=T0 + DAY, now=T0, max_late=MAX_LATE)
    assert calendar_entries(moments, changes) == (
        CalendarEntry(FOLLOWUP, M2, 1),
        CalendarEntry(ACTION, M1, 0),
    )


def test_only_staff_mail_gets_the_calendar() -> None:
    routed = route(
        event(
            activityUsers="bob",
            sendContentByEmail="Yes",
            activityText="x",
            followupDate="2026-12-02",
        ),
        DIRECTORY,
        RoutingPolicy(),
    )
    entries = (CalendarEntry(FOLLOWUP, M1, 0),)
    out = add_calendar(routed.notifications, entries)
    assert {n.kind: n.calendar for n in out} == {Kind.CUSTOMER_CONTENT: (), Kind.STAFF: entries}


# --- recipients ---------------------------------------------------------------------------


def reminder_event(**fields: Any) -> ActivityEvent:
    base = {
        "activityUser": "alice",
        "activityDepartments": "support",
        "activityUsers": "carol, BOB, nobody-known",
        "activitySuppliers": "acme",
        "sendContentByEmail": "Yes",
        "activityText": "Please call the customer back.",
        "commentText": "VIP customer",
        "ticketActivityType": "Phone call",
        "followupDate": "2026-12-02",
        "followupTime": "09:00",
    }
    return event(**{**base, **fields})


def test_reminders_go_to_the_author_and_the_staff_once_per_address() -> None:
    result = reminder_notifications(reminder_event(), DIRECTORY, FOLLOWUP, M1, BERLIN)
    addresses = [n.recipient.email for n in result.notifications]
    assert addresses == ["alice@helpdesk.test", "Bob@Helpdesk.test", "carol@helpdesk.test"]
    assert result.withheld == ()
    assert result.unresolved == (Unresolved("activityUsers", "nobody-known"),)


def test_reminders_never_go_to_the_customer_or_a_supplier() -> None:
    result = reminder_notifications(reminder_event(), DIRECTORY, ACTION, M1, BERLIN)
    addresses = {n.recipient.email.lower() for n in result.notifications}
    assert "dana@customer.test" not in addresses
    assert "orders@acme.test" not in addresses
    assert {n.kind for n in result.notifications} == {ACTION}


def test_an_author_the_directory_does_not_know_gets_no_reminder() -> None:
    result = reminder_notifications(
        reminder_event(activityUser="Mallory", activityDepartments=""), DIRECTORY, FOLLOWUP, M1, UTC
    )
    assert [n.recipient.email for n in result.notifications] == [
        "carol@helpdesk.test",
        "Bob@Helpdesk.test",
    ]


def test_a_reminder_carries_staff_content_and_its_moment() -> None:
    [first, *_] = reminder_notifications(
        reminder_event(), DIRECTORY, FOLLOWUP, M1, BERLIN
    ).notifications
    assert first.kind is FOLLOWUP
    assert first.moment == "2026-12-02T08:00:00Z"
    assert first.key == ("5001", "followup_reminder", "alice@helpdesk.test", "2026-12-02T08:00:00Z")
    assert first.comment_text == "VIP customer"
    assert first.activity_text == "Please call the customer back."
    assert first.activity_type == "Phone call"
    assert first.author == "Alice Jones"
    assert (first.ticket_reference, first.ticket_subject) == ("T-1042", "Printer on floor 3 jams")
    assert first.followup == dt.datetime(2026, 12, 2, 9, 0, tzinfo=BERLIN)
    assert first.attachments == ()


def test_the_action_reminder_shows_its_moment_in_the_zone() -> None:
    [first, *_] = reminder_notifications(
        reminder_event(actionRequiredDate="2026-07-01"),
        DIRECTORY,
        ACTION,
        utc(2026, 7, 1, 7),
        BERLIN,
    ).notifications
    assert first.action_required == dt.datetime(2026, 7, 1, 9, 0, tzinfo=BERLIN)
    assert first.action_required_time is None


def test_a_moved_reminder_is_a_new_key_but_staff_keys_have_no_moment() -> None:
    one = reminder_notifications(reminder_event(), DIRECTORY, FOLLOWUP, M1, UTC).notifications
    two = reminder_notifications(reminder_event(), DIRECTORY, FOLLOWUP, M2, UTC).notifications
    assert {n.key for n in one}.isdisjoint({n.key for n in two})
    staff = route(reminder_event(), DIRECTORY, RoutingPolicy()).notifications
    assert {n.key[3] for n in staff} == {""}


def test_only_reminder_kinds_are_accepted() -> None:
    with pytest.raises(ValueError, match="not a reminder kind"):
        reminder_notifications(reminder_event(), DIRECTORY, Kind.STAFF, M1, UTC)


def test_staff_mail_still_leaves_the_author_out() -> None:
    staff = route(reminder_event(), DIRECTORY, RoutingPolicy()).notifications
    assert "alice@helpdesk.test" not in {n.recipient.email for n in staff if n.kind is Kind.STAFF}


def test_moments_compare_as_instants_whatever_zone_they_are_stored_in() -> None:
    # 02:30 CEST on 25 October is a repeated wall time: Python calls it unequal to the same
    # instant in UTC (PEP 495), so the planner compares in UTC.
    local = dt.datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN)
    row = Reminder(FOLLOWUP, local, 0, ReminderState.SCHEDULED, T0)
    assert local != local.astimezone(UTC)
    before = utc(2026, 10, 20, 0, 0)
    change = plan([row], {FOLLOWUP: utc(2026, 10, 25, 0, 30)}, version=T0, now=before)[FOLLOWUP]
    assert change.action is Action.KEEP
    assert not change.store
