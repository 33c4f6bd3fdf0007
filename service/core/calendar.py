"""iCalendar (`.ics`, RFC 5545) attachments for staff mail: one event per reminder date."""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from zoneinfo import ZoneInfo

from icalendar import Alarm, Calendar, Event, Timezone

from service.core.message import Attachment
from service.core.routing import CalendarEntry, Kind, Notification

CONTENT_TYPE = "text/calendar; charset=utf-8; method=PUBLISH"
PRODID = "-//ticket-notifier//reminders//EN"
# A reminder is a point in time; calendars show a short slot rather than a zero-length one.
SLOT = dt.timedelta(minutes=30)
_UTC_KEYS = frozenset({"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"})
# The UID's first part per kind: stable per (activity, kind), so a moved date updates the
# entry already in the recipient's calendar instead of adding a second one.
_UID_PREFIX = {Kind.FOLLOWUP_REMINDER: "followup", Kind.ACTION_REMINDER: "action"}
_SUMMARY = {
    "en": {Kind.FOLLOWUP_REMINDER: "Follow-up due", Kind.ACTION_REMINDER: "Action required"},
    "de": {Kind.FOLLOWUP_REMINDER: "Wiedervorlage", Kind.ACTION_REMINDER: "Handlungsbedarf"},
}


def calendar_uid(kind: Kind, activity_id: str, domain: str) -> str:
    """`followup.{activity}@{domain}` or `action.{activity}@{domain}`."""
    return f"{_UID_PREFIX[kind]}.{activity_id}@{domain}"


def calendar_attachment(
    n: Notification, *, zone: dt.tzinfo, domain: str, stamp: dt.datetime
) -> Attachment | None:
    """The `.ics` file for `n.calendar` (None when it is empty), METHOD:PUBLISH.

    Each entry becomes a VEVENT with a stable UID, the caller's SEQUENCE and DTSTART in
    `zone` with its VTIMEZONE (in UTC when `zone` is UTC, or when the local time occurs
    twice and this is its second occurrence, which a TZID form cannot name). The SUMMARY
    holds the ticket reference and subject and what is due; never any activity text.
    `stamp` (DTSTAMP) is when the file is made: the caller's clock, not read here.
    """
    if not n.calendar:
        return None
    language = n.recipient.locale.split("-")[0].split("_")[0].lower()
    reference = n.ticket_reference or n.ticket_id
    # DTSTAMP has whole seconds: every staff recipient of an activity whose mail is made
    # within one second gets the same bytes, made once (the library's serialising is most
    # of a staff mail's CPU).
    data = _calendar_ical(
        n.calendar,
        n.activity_id,
        reference,
        n.ticket_subject,
        language if language in _SUMMARY else "en",
        zone,
        domain,
        stamp.astimezone(dt.UTC).replace(microsecond=0),
    )
    return Attachment(f"{reference}.ics", CONTENT_TYPE, data)


@lru_cache(maxsize=256)
def _calendar_ical(
    entries: tuple[CalendarEntry, ...],
    activity_id: str,
    reference: str,
    subject: str,
    language: str,
    zone: dt.tzinfo,
    domain: str,
    stamp: dt.datetime,
) -> bytes:
    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("method", "PUBLISH")
    starts = [_start(entry.moment, zone) for entry in entries]
    timezone = b""
    if isinstance(zone, ZoneInfo) and any(start.tzinfo is zone for start in starts):
        years = [start.year for start in starts]
        timezone = _vtimezone_ical(zone, min(years), max(years))
    summary = f"[{reference}] {subject}"
    for entry, start in zip(entries, starts, strict=True):
        label = _SUMMARY[language][entry.kind]
        uid = calendar_uid(entry.kind, activity_id, domain)
        calendar.add_component(_event(uid, entry, start, f"{label}: {summary}".strip(), stamp))
    # The VTIMEZONE is the calendar's first component: its text, made once per zone and
    # years, goes before the first VEVENT (serialising it took most of a staff mail's CPU).
    data = bytes(calendar.to_ical())
    if timezone:
        at = data.index(b"BEGIN:VEVENT\r\n")
        data = data[:at] + timezone + data[at:]
    return data


def _start(moment: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    """DTSTART: local to `zone` when a TZID form names exactly this instant, else UTC."""
    utc = moment.astimezone(dt.UTC)
    if not isinstance(zone, ZoneInfo) or zone.key in _UTC_KEYS:
        return utc
    local = utc.astimezone(zone)
    # RFC 5545 §3.3.5 reads a repeated local time as its first occurrence.
    if local.replace(fold=0).astimezone(dt.UTC) != utc:
        return utc
    return local


def _event(
    uid: str, entry: CalendarEntry, start: dt.datetime, summary: str, stamp: dt.datetime
) -> Event:
    event = Event()
    event.add("uid", uid)
    event.add("sequence", entry.sequence)
    event.add("dtstamp", stamp)
    event.add("dtstart", start)
    # DURATION, not DTEND: a wall-clock end could fall into a DST change and read wrongly.
    event.add("duration", SLOT)
    event.add("summary", summary)
    event.add("transp", "TRANSPARENT")  # a reminder, not a meeting: it blocks no time
    alarm = Alarm()
    alarm.add("action", "DISPLAY")
    alarm.add("description", summary)
    alarm.add("trigger", dt.timedelta(0))
    event.add_component(alarm)
    return event


@lru_cache(maxsize=32)
def _vtimezone_ical(zone: ZoneInfo, first_year: int, last_year: int) -> bytes:
    """The VTIMEZONE of `zone` over the years the events fall in, as text (made once)."""
    timezone = Timezone.from_tzinfo(
        zone,
        tzid=zone.key,
        first_date=dt.date(first_year, 1, 1),
        last_date=dt.date(last_year + 1, 1, 1),
    )
    return bytes(timezone.to_ical())
