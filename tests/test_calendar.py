"""Tests of service.core.calendar: every .ics is parsed back with icalendar and checked."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import uuid
from dataclasses import replace
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from icalendar import Calendar, Event

from devkit.events import make_notification
from service.core.calendar import CONTENT_TYPE, calendar_attachment, calendar_uid
from service.core.message import Attachment, build_message
from service.core.reminders import resolve_moment
from service.core.render import RenderedMail
from service.core.routing import CalendarEntry, Kind, Notification

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
STAMP = dt.datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
DOMAIN = "helpdesk.test"
FOLLOWUP, ACTION = Kind.FOLLOWUP_REMINDER, Kind.ACTION_REMINDER
WINTER = dt.datetime(2026, 12, 1, 13, 30, tzinfo=UTC)  # 14:30 CET
SUMMER = dt.datetime(2026, 7, 1, 7, 0, tzinfo=UTC)  # 09:00 CEST


def staff(*entries: CalendarEntry, locale: str = "en") -> Notification:
    return make_notification(Kind.STAFF, calendar=entries, locale=locale)


def ics(n: Notification, zone: dt.tzinfo = BERLIN) -> Attachment:
    made = calendar_attachment(n, zone=zone, domain=DOMAIN, stamp=STAMP)
    assert made is not None
    return made


def instant(value: dt.datetime) -> dt.datetime:
    """In UTC: Python never calls two aware datetimes of different zones equal when one of
    them is a repeated or skipped wall time (PEP 495), so instants are compared in UTC."""
    return value.astimezone(UTC)


def parse(attachment: Attachment) -> Calendar:
    return Calendar.from_ical(attachment.data)


def events(attachment: Attachment) -> dict[str, Event]:
    return {str(e["UID"]): e for e in parse(attachment).events}


def unique_tzid() -> bytes:
    """A TZID no parser knows, so the VTIMEZONE must define it (icalendar caches by TZID)."""
    return f"Custom/Zone-{uuid.uuid4().hex}".encode()


def test_no_dates_no_attachment() -> None:
    assert calendar_attachment(staff(), zone=BERLIN, domain=DOMAIN, stamp=STAMP) is None


def test_one_event_per_date_with_uid_sequence_and_moment_in_the_zone() -> None:
    made = ics(staff(CalendarEntry(FOLLOWUP, SUMMER, 3), CalendarEntry(ACTION, WINTER, 0)))
    assert made.content_type == CONTENT_TYPE == "text/calendar; charset=utf-8; method=PUBLISH"
    assert made.filename == "T-1042.ics"
    calendar = parse(made)
    assert str(calendar["METHOD"]) == "PUBLISH"
    assert str(calendar["VERSION"]) == "2.0"
    assert [tz.tz_name for tz in calendar.timezones] == ["Europe/Berlin"]
    found = events(made)
    assert set(found) == {"followup.5001@helpdesk.test", "action.5001@helpdesk.test"}
    followup, action = found["followup.5001@helpdesk.test"], found["action.5001@helpdesk.test"]
    assert int(followup["SEQUENCE"]) == 3
    assert int(action["SEQUENCE"]) == 0
    assert instant(followup.start) == SUMMER
    assert instant(action.start) == WINTER
    assert followup.start.tzinfo == BERLIN
    assert (followup.start.hour, action.start.hour) == (9, 14)
    assert followup.duration == dt.timedelta(minutes=30)
    assert followup["DTSTAMP"].dt == STAMP
    assert b"DTSTART;TZID=Europe/Berlin:20260701T090000" in made.data


def test_the_vtimezone_alone_gives_the_right_instant() -> None:
    # A parser that does not know the zone by name must get the same instant from the
    # VTIMEZONE the file carries: rename the zone and parse again.
    made = ics(staff(CalendarEntry(FOLLOWUP, SUMMER, 0), CalendarEntry(ACTION, WINTER, 0)))
    renamed = Calendar.from_ical(made.data.replace(b"Europe/Berlin", unique_tzid()))
    starts = sorted(instant(e.start) for e in renamed.events)
    assert starts == [SUMMER, WINTER]
    assert all(str(e.start.tzinfo) != "Europe/Berlin" for e in renamed.events)


def test_utc_is_written_with_z_and_no_vtimezone() -> None:
    made = ics(staff(CalendarEntry(FOLLOWUP, WINTER, 1)), zone=ZoneInfo("UTC"))
    assert b"DTSTART:20261201T133000Z" in made.data
    assert parse(made).timezones == []
    assert instant(next(iter(events(made).values())).start) == WINTER
    assert ics(staff(CalendarEntry(FOLLOWUP, WINTER, 1)), zone=UTC).data == made.data


def test_the_uid_is_stable_and_the_sequence_grows_when_the_date_moves() -> None:
    first = events(ics(staff(CalendarEntry(FOLLOWUP, WINTER, 0))))
    moved = events(ics(staff(CalendarEntry(FOLLOWUP, WINTER + dt.timedelta(days=2), 1))))
    assert set(first) == set(moved) == {calendar_uid(FOLLOWUP, "5001", DOMAIN)}
    [before], [after] = first.values(), moved.values()
    assert int(after["SEQUENCE"]) > int(before["SEQUENCE"])
    assert instant(after.start) - instant(before.start) == dt.timedelta(days=2)


def test_a_time_in_the_spring_gap_is_written_as_the_instant_it_became() -> None:
    moment = resolve_moment(dt.date(2026, 3, 29), dt.time(2, 30), BERLIN, dt.time(9))
    made = ics(staff(CalendarEntry(FOLLOWUP, moment, 0)))
    assert b"DTSTART;TZID=Europe/Berlin:20260329T033000" in made.data
    assert instant(next(iter(events(made).values())).start) == moment


def test_the_second_of_two_equal_autumn_times_is_written_in_utc() -> None:
    first = resolve_moment(dt.date(2026, 10, 25), dt.time(2, 30), BERLIN, dt.time(9))
    second = first + dt.timedelta(hours=1)  # 02:30 CET, the repeated hour
    made = ics(staff(CalendarEntry(FOLLOWUP, first, 0), CalendarEntry(ACTION, second, 0)))
    assert b"DTSTART;TZID=Europe/Berlin:20261025T023000" in made.data
    assert b"DTSTART:20261025T013000Z" in made.data
    found = events(made)
    assert instant(found["followup.5001@helpdesk.test"].start) == first
    assert instant(found["action.5001@helpdesk.test"].start) == second


def test_staff_of_one_activity_made_in_one_second_share_one_file_made_once() -> None:
    entry = CalendarEntry(FOLLOWUP, WINTER, 2)
    alice = make_notification(Kind.STAFF, calendar=(entry,), email="alice@helpdesk.test")
    bob = make_notification(Kind.STAFF, calendar=(entry,), email="bob@helpdesk.test")
    first = calendar_attachment(alice, zone=BERLIN, domain=DOMAIN, stamp=STAMP)
    same_second = STAMP + dt.timedelta(microseconds=999_999)
    second = calendar_attachment(bob, zone=BERLIN, domain=DOMAIN, stamp=same_second)
    assert first is not None
    assert second is not None
    assert second.data is first.data  # the same bytes object: serialised once
    later = calendar_attachment(bob, zone=BERLIN, domain=DOMAIN, stamp=STAMP + dt.timedelta(1))
    assert later is not None
    assert later.data != first.data
    [event] = events(later).values()
    assert event["DTSTAMP"].dt == STAMP + dt.timedelta(1)


@pytest.mark.parametrize(
    ("locale", "label"),
    [("en", "Follow-up due"), ("de-AT", "Wiedervorlage"), ("fr", "Follow-up due")],
)
def test_summary_names_what_is_due_and_the_ticket_but_no_text(locale: str, label: str) -> None:
    n = staff(CalendarEntry(FOLLOWUP, WINTER, 0), locale=locale)
    [event] = events(ics(n)).values()
    assert str(event["SUMMARY"]) == f"{label}: [T-1042] Printer on floor 3 jams"
    for secret in (n.comment_text, n.activity_text, n.update_text):
        assert secret
        assert secret.encode() not in ics(n).data


def test_text_is_escaped_not_interpreted() -> None:
    n = make_notification(
        Kind.STAFF,
        ticket_subject="Drucker; kaputt, \\ END:VCALENDAR",
        calendar=(CalendarEntry(ACTION, WINTER, 0),),
    )
    calendar = parse(ics(n))
    [event] = calendar.events
    assert str(event["SUMMARY"]).endswith("Drucker; kaputt, \\ END:VCALENDAR")
    assert ics(n).data.split(b"\r\n").count(b"END:VCALENDAR") == 1


def test_the_attachment_survives_mime_with_its_method() -> None:
    n = staff(CalendarEntry(FOLLOWUP, WINTER, 0))
    made = ics(n)
    raw = build_message(
        n,
        RenderedMail("[T-1042] Printer", "text", "<p>html</p>"),
        sender="Helpdesk <helpdesk@helpdesk.test>",
        reply_to=None,
        domain=DOMAIN,
        attachments=[made],
        date=STAMP,
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = [p for p in message.walk() if p.get_content_type() == "text/calendar"]
    assert part.get_param("method") == "PUBLISH"
    assert part.get_content_charset() == "utf-8"
    assert part.get_filename() == "T-1042.ics"
    assert part.get_payload(decode=True) == made.data
    assert instant(Calendar.from_ical(part.get_payload(decode=True)).events[0].start) == WINTER


ZONES = st.sampled_from(
    ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC", "Asia/Kolkata"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ZONES,
    st.datetimes(min_value=dt.datetime(2025, 1, 1), max_value=dt.datetime(2028, 12, 31)),
    st.integers(min_value=0, max_value=50),
)
def test_every_moment_parses_back_to_itself(
    zone_name: str, naive: dt.datetime, sequence: int
) -> None:
    zone = ZoneInfo(zone_name)
    moment = resolve_moment(naive.date(), naive.time().replace(microsecond=0), zone, dt.time(9))
    made = ics(staff(CalendarEntry(ACTION, moment, sequence)), zone=zone)
    [event] = parse(made).events
    assert instant(event.start) == moment
    assert int(event["SEQUENCE"]) == sequence
    assert str(event["UID"]) == "action.5001@helpdesk.test"
    # icalendar caches zones by TZID, so each example renames to a name of its own.
    renamed = Calendar.from_ical(made.data.replace(zone_name.encode(), unique_tzid()))
    assert instant(renamed.events[0].start) == moment


def whole_calendar(
    entries: tuple[CalendarEntry, ...], activity: str, summary: str, language: str, zone: dt.tzinfo
) -> bytes:
    """The file as icalendar writes the whole calendar (what the skeleton must equal)."""
    from service.core.calendar import _SUMMARY, PRODID, _event, _start, _vtimezone_ical

    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("method", "PUBLISH")
    starts = [_start(entry.moment, zone) for entry in entries]
    for entry, start in zip(entries, starts, strict=True):
        label = _SUMMARY[language][entry.kind]
        uid = calendar_uid(entry.kind, activity, DOMAIN)
        calendar.add_component(_event(uid, entry, start, f"{label}: {summary}".strip(), STAMP))
    data = bytes(calendar.to_ical())
    if isinstance(zone, ZoneInfo) and any(start.tzinfo is zone for start in starts):
        years = [start.year for start in starts]
        at = data.index(b"BEGIN:VEVENT\r\n")
        data = data[:at] + _vtimezone_ical(zone, min(years), max(years)) + data[at:]
    return data


# Escaped characters, a line break, non-ASCII and wide characters (folding counts octets).
TEXT = st.text(st.sampled_from(list('aZ 09,;:\\"\n\r\täß€😀\u2060<>&')), max_size=150)
# Plain ASCII around the length where a line starts to be folded (75 octets).
ASCII = st.text(st.sampled_from(list("aZ 09-")), min_size=30, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ZONES,
    st.lists(
        st.tuples(
            st.sampled_from([FOLLOWUP, ACTION]),
            st.datetimes(min_value=dt.datetime(2025, 1, 1), max_value=dt.datetime(2028, 12, 31)),
            st.integers(min_value=0, max_value=10**6),
        ),
        min_size=1,
        max_size=3,
    ),
    st.one_of(ASCII, TEXT),
    st.one_of(ASCII, st.text(st.sampled_from(list("aZ09-,;\\ä")), min_size=1, max_size=60)),
    st.sampled_from(["en", "de"]),
)
def test_the_file_is_what_icalendar_writes_for_the_whole_calendar(
    zone_name: str,
    dates: list[tuple[Kind, dt.datetime, int]],
    subject: str,
    activity: str,
    language: str,
) -> None:
    zone = ZoneInfo(zone_name)
    entries = tuple(
        CalendarEntry(kind, naive.replace(tzinfo=UTC), sequence) for kind, naive, sequence in dates
    )
    n = replace(staff(*entries, locale=language), activity_id=activity, ticket_subject=subject)
    made = ics(n, zone=zone)
    assert made.data == whole_calendar(entries, activity, f"[T-1042] {subject}", language, zone)
