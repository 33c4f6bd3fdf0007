"""iCalendar (`.ics`, RFC 5545) attachments for staff mail: one event per reminder date."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo

from icalendar import Alarm, Calendar, Event, Timezone, vDDDTypes, vText
from icalendar.parser import Contentline

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
    # within one second gets the same bytes, made once.
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
    starts = [_start(entry.moment, zone) for entry in entries]
    timezone = b""
    if isinstance(zone, ZoneInfo) and any(start.tzinfo is zone for start in starts):
        years = [start.year for start in starts]
        timezone = _vtimezone_ical(zone, min(years), max(years))
    summary = f"[{reference}] {subject}"
    shape = tuple(
        (entry.kind, start.tzinfo is zone) for entry, start in zip(entries, starts, strict=True)
    )
    values = {_STAMP: vDDDTypes(stamp).to_ical().decode()}
    for i, (entry, start) in enumerate(zip(entries, starts, strict=True)):
        label = _SUMMARY[language][entry.kind]
        values[f"UID{i}"] = _text(calendar_uid(entry.kind, activity_id, domain))
        values[f"SEQUENCE{i}"] = str(entry.sequence)
        values[f"DTSTART{i}"] = vDDDTypes(start).to_ical().decode()
        values[f"TEXT{i}"] = _text(f"{label}: {summary}".strip())
    data = _skeleton(shape, zone).fill(values)
    # The VTIMEZONE is the calendar's first component: its text, made once per zone and
    # years, goes before the first VEVENT.
    if timezone:
        at = data.index(b"BEGIN:VEVENT\r\n")
        data = data[:at] + timezone + data[at:]
    return data


# A skeleton is icalendar's serialising of a whole calendar of one shape, made once, with
# stand-ins where each file's own values go; each content line holds at most one value.
_STAMP = "STAMP"
_MARK = "\u2060{}\u2060"  # WORD JOINER around a TEXT stand-in: icalendar escapes neither
_MARKED = re.compile("\u2060([A-Z]+[0-9]+)\u2060")
_SEQUENCE_BASE = 900_000_000  # stand-in SEQUENCE of entry i: 900000000 + i
_STAND_IN_STAMP = dt.datetime(1901, 1, 1, tzinfo=dt.UTC)
_FOLD_AT = 75  # icalendar folds a line once it reaches 75 octets


def _text(value: str) -> str:
    """A TEXT value as icalendar writes it (escaped, unfolded)."""
    return vText(value).to_ical().decode()


def _stand_in_start(i: int, local: bool, zone: dt.tzinfo) -> dt.datetime:
    return dt.datetime(1901, 1, 2, i // 60 % 24, i % 60, tzinfo=zone if local else dt.UTC)


@dataclass(frozen=True, slots=True)
class _Skeleton:
    """Content lines: bytes as they are, or (before, value name, after) to fill in."""

    lines: tuple[bytes | tuple[str, str, str], ...]

    def fill(self, values: dict[str, str]) -> bytes:
        out: list[bytes] = []
        for line in self.lines:
            if isinstance(line, bytes):
                out.append(line)
                continue
            before, name, after = line
            text = f"{before}{values[name]}{after}"
            # Short ASCII lines are not folded; the others are folded by icalendar itself.
            if len(text) < _FOLD_AT and text.isascii():
                out.append(text.encode())
            else:
                out.append(_folded(text))
        return b"\r\n".join(out) + b"\r\n"


@lru_cache(maxsize=64)
def _skeleton(shape: tuple[tuple[Kind, bool], ...], zone: dt.tzinfo) -> _Skeleton:
    """The calendar of `shape` ((kind, start written in `zone`?) per entry), by icalendar.

    icalendar writes every property through its generic machinery (parameters, escaping,
    folding character by character): ~0.5 ms per file, most of a staff mail's CPU, while
    all but a few values are the same in every file. Those values are written by
    icalendar's own value types and line folding in `_calendar_ical`.
    """
    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("method", "PUBLISH")
    stand_ins = {vDDDTypes(_STAND_IN_STAMP).to_ical().decode(): _STAMP}
    for i, (kind, local) in enumerate(shape):
        start = _stand_in_start(i, local, zone)
        entry = CalendarEntry(kind, start, _SEQUENCE_BASE + i)
        summary = _MARK.format(f"TEXT{i}")
        uid = _MARK.format(f"UID{i}")
        calendar.add_component(_event(uid, entry, start, summary, _STAND_IN_STAMP))
        stand_ins[vDDDTypes(start).to_ical().decode()] = f"DTSTART{i}"
        stand_ins[str(_SEQUENCE_BASE + i)] = f"SEQUENCE{i}"
    lines: list[bytes | tuple[str, str, str]] = []
    for line in calendar.to_ical().decode().replace("\r\n ", "").split("\r\n")[:-1]:
        marked = _MARKED.search(line)
        before, colon, value = line.rpartition(":")
        if marked is not None:
            lines.append((line[: marked.start()], marked[1], line[marked.end() :]))
        elif colon and value in stand_ins:
            lines.append((before + colon, stand_ins[value], ""))
        else:
            lines.append(_folded(line))
    return _Skeleton(tuple(lines))


def _folded(line: str) -> bytes:
    """A content line folded by icalendar (at 75 octets, never inside an escape)."""
    folded: bytes = Contentline(line).to_ical()  # type: ignore[no-untyped-call]
    return folded


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
