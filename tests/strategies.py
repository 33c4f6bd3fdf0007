"""Hypothesis strategies: activities in wire shape (every lenient variant) and ActivityEvents.

Builders of fixed strategies are cached (`functools.cache`): a strategy object is
immutable and reusable, and hypothesis validates each new one on its first draw, which
cost more than the drawing itself when composites built them afresh for every example.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import string
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from service.core.events import (
    Activity,
    ActivityEvent,
    Customer,
    Ticket,
    cloudevent_for,
    parse_event,
)

# Aliases of the activity fields, grouped by shape.
YES_NO_FIELDS = ("containsPersonalData", "sendContentByEmail", "sendUpdateByEmail")
TEXT_FIELDS = ("activityText", "commentText", "updateText")
PRESET_TEXT_FIELDS = ("ticketActivityType", "activityUser")
LIST_FIELDS = (
    "activityDepartments",
    "activityUsers",
    "activitySuppliers",
    "standardTicketAttachments",
    "thisTicketAttachments",
    "invoiceAttachments",
)
DATE_FIELDS = (
    "activityDate",
    "responseReceivedDate",
    "responseAcknowledgedDate",
    "actionTakenDate",
    "actionRequiredDate",
    "followupDate",
)
TIME_FIELDS = ("actionRequiredTime", "followupTime")

_TOKEN_ALPHABET = string.ascii_letters + string.digits + "-_./ äöüßé"
_OFFSETS = (
    dt.UTC,
    dt.timezone(dt.timedelta(hours=1)),
    dt.timezone(dt.timedelta(hours=-5, minutes=-30)),
)


# --- canonical values (what a parsed Activity holds) ---------------------------------------


@functools.cache
def identifiers() -> st.SearchStrategy[str]:
    """Activity and ticket ids: numeric text or UUIDs."""
    return st.integers(1, 10**9).map(str) | st.uuids().map(str)


@functools.cache
def tokens() -> st.SearchStrategy[str]:
    """One list-field token: trimmed, no separators (so it survives the text form)."""
    return st.text(_TOKEN_ALPHABET, min_size=1, max_size=20).map(str.strip).filter(bool)


@functools.cache
def attachment_refs() -> st.SearchStrategy[str]:
    """Attachment store references such as `tickets/1042/quote.pdf`."""
    return st.builds(
        lambda folder, name, ext: f"{folder}/{name}.{ext}",
        st.sampled_from(["standard", "tickets/1042", "invoices"]),
        st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12),
        st.sampled_from(["pdf", "txt", "png"]),
    )


@functools.cache
def texts(alphabet: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    """Free texts, including multi-line and non-ASCII ones."""
    return st.text(alphabet if alphabet is not None else st.characters(codec="utf-8"), max_size=120)


@functools.cache
def dates() -> st.SearchStrategy[dt.date | dt.datetime | None]:
    """Unset, a date, or a naive or offset-aware date-time."""
    moment = st.datetimes(dt.datetime(1990, 1, 1), dt.datetime(2100, 1, 1))
    return st.one_of(
        st.none(),
        st.dates(dt.date(1990, 1, 1), dt.date(2100, 1, 1)),
        moment,
        st.builds(lambda m, tz: m.replace(tzinfo=tz), moment, st.sampled_from(_OFFSETS)),
    )


@functools.cache
def times() -> st.SearchStrategy[dt.time | None]:
    """Unset or a whole-second time of day."""
    return st.none() | st.times().map(lambda t: t.replace(microsecond=0))


@st.composite
def activities(
    draw: st.DrawFn,
    *,
    departments: st.SearchStrategy[str] | None = None,
    users: st.SearchStrategy[str] | None = None,
    suppliers: st.SearchStrategy[str] | None = None,
    authors: st.SearchStrategy[str | None] | None = None,
    text: st.SearchStrategy[str] | None = None,
    comments: st.SearchStrategy[str] | None = None,
    ticket_id: str | None = None,
) -> Activity:
    """Valid activities; pass token strategies to aim the recipient fields at a directory."""
    text = text if text is not None else texts()

    def some(strategy: st.SearchStrategy[str] | None) -> tuple[str, ...]:
        return tuple(draw(_up_to_four(strategy if strategy is not None else tokens())))

    return Activity(
        id=draw(identifiers()),
        ticket_id=ticket_id or draw(identifiers()),
        parent_activity=draw(st.none() | identifiers()),
        ticket_activity_type=draw(st.none() | tokens()),
        activity_user=draw(authors if authors is not None else st.none() | tokens()),
        contains_personal_data=draw(st.booleans()),
        activity_text=draw(text),
        send_content_by_email=draw(st.booleans()),
        comment_text=draw(comments if comments is not None else text),
        update_text=draw(text),
        send_update_by_email=draw(st.booleans()),
        activity_departments=some(departments),
        activity_users=some(users),
        activity_suppliers=some(suppliers),
        standard_ticket_attachments=some(attachment_refs()),
        this_ticket_attachments=some(attachment_refs()),
        invoice_attachments=some(attachment_refs()),
        activity_date=draw(dates()),
        response_received_date=draw(dates()),
        response_acknowledged_date=draw(dates()),
        action_taken_date=draw(dates()),
        action_required_date=draw(dates()),
        action_required_time=draw(times()),
        followup_date=draw(dates()),
        followup_time=draw(times()),
    )


@functools.cache
def _up_to_four(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(strategy, max_size=4)


@functools.cache
def customers() -> st.SearchStrategy[Customer]:
    """Customers with plain addresses in English or German."""
    local = st.text(string.ascii_lowercase + string.digits + "._-", min_size=1, max_size=12)
    return st.builds(
        Customer,
        name=st.text(string.ascii_letters + " ", max_size=20).map(" ".join).map(str.strip),
        email=local.map(lambda part: f"{part}@customer.test"),
        locale=st.sampled_from(["en", "de"]),
    )


def tickets(ticket_id: str) -> st.SearchStrategy[Ticket]:
    """Ticket context for `ticket_id`, with or without a customer."""
    return st.builds(
        Ticket,
        id=st.just(ticket_id),
        reference=st.just(f"T-{ticket_id}") | st.just(""),
        subject=st.text(string.ascii_letters + " ", max_size=30).map(str.strip),
        customer=st.none() | customers(),
    )


@st.composite
def activity_events(
    draw: st.DrawFn,
    activity: st.SearchStrategy[Activity] | None = None,
    *,
    with_ticket: bool | None = None,
) -> ActivityEvent:
    """Events as a producer publishes them, parsed back (so they are exactly what consumers get)."""
    chosen = draw(activity if activity is not None else activities())
    has_ticket = draw(st.booleans()) if with_ticket is None else with_ticket
    ticket = draw(tickets(chosen.ticket_id)) if has_ticket else None
    kind = draw(st.sampled_from(["ticketActivity.created", "ticketActivity.updated"]))
    wire = cloudevent_for(chosen, type=kind, ticket=ticket, event_id=str(draw(st.uuids())))
    return parse_event(json.dumps(wire).encode(), {})


# --- wire encodings (every shape the lenient parser accepts) -------------------------------


@functools.cache
def wire_yes_no(value: bool) -> st.SearchStrategy[Any]:
    """Every accepted spelling of a yes/no preset."""
    word = st.sampled_from(["Yes", "yes", "YES", "Y", "y", "true", "True", "TRUE", " Yes "])
    if not value:
        word = st.sampled_from(["No", "no", "NO", "N", "n", "false", "False", "FALSE", " no ", ""])
    spelled = st.one_of(st.just(value), word, st.just(int(value)), st.just(str(int(value))))
    preset = st.builds(
        lambda key, pid, inner: {"id": pid, key: inner},
        st.sampled_from(["name", "value", "label"]),
        st.integers(1, 99),
        spelled,
    )
    fallback = spelled.map(lambda inner: {"id": 1, "name": None, "value": inner})
    absent = st.just(None) if not value else st.nothing()
    return st.one_of(spelled, preset, fallback, absent)


def wire_preset_text(value: str | None) -> st.SearchStrategy[Any]:
    """A preset text as a string (maybe padded) or a preset object."""
    if value is None:
        return st.sampled_from([None, "", "  ", {"id": 3, "name": None}])
    return st.one_of(
        st.just(value),
        st.just(f"  {value} "),
        st.sampled_from(["name", "value", "label"]).map(lambda key: {"id": 9, key: value}),
    )


def wire_identifier(value: str, *, optional: bool = False) -> st.SearchStrategy[Any]:
    """An id as text, padded text, or an integer when it is one."""
    options: list[st.SearchStrategy[Any]] = [st.just(value), st.just(f" {value} ")]
    if value.isdigit() and not value.startswith("0") and len(value) < 18:
        options.append(st.just(int(value)))
    return st.one_of(*options)


def wire_optional_identifier(value: str | None) -> st.SearchStrategy[Any]:
    return st.sampled_from([None, ""]) if value is None else wire_identifier(value)


def wire_tokens(value: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """A list field as separated text, a JSON array, or null/blank when empty."""
    if not value:
        return st.sampled_from([None, "", [], " , ;\n", ["", " "]])
    joined = st.lists(
        st.sampled_from([",", ", ", ";", "; ", "\n", "\r\n", " ;\n"]),
        min_size=len(value) - 1,
        max_size=len(value) - 1,
    ).map(lambda seps: value[0] + "".join(s + t for s, t in zip(seps, value[1:], strict=True)))
    padded = st.just(", ".join(value) + ";\n")
    return st.one_of(joined, padded, st.just(list(value)), st.just([" ", *value, ""]))


def wire_date(value: dt.date | dt.datetime | None) -> st.SearchStrategy[Any]:
    if value is None:
        return st.sampled_from([None, "", "  "])
    text = value.isoformat()
    if isinstance(value, dt.datetime) and value.utcoffset() == dt.timedelta(0):
        return st.sampled_from([text, text.replace("+00:00", "Z")])
    return st.just(text)


def wire_time(value: dt.time | None) -> st.SearchStrategy[Any]:
    if value is None:
        return st.sampled_from([None, ""])
    options = [value.strftime("%H:%M:%S")]
    if value.second == 0:
        options.append(value.strftime("%H:%M"))
    return st.sampled_from(options)


def wire_text(value: str) -> st.SearchStrategy[Any]:
    return st.sampled_from(["", None]) if value == "" else st.just(value)


_ENCODERS: dict[str, Callable[[Any], st.SearchStrategy[Any]]] = {
    **dict.fromkeys(YES_NO_FIELDS, wire_yes_no),
    **dict.fromkeys(TEXT_FIELDS, wire_text),
    **dict.fromkeys(PRESET_TEXT_FIELDS, wire_preset_text),
    **dict.fromkeys(LIST_FIELDS, wire_tokens),
    **dict.fromkeys(DATE_FIELDS, wire_date),
    **dict.fromkeys(TIME_FIELDS, wire_time),
    "id": wire_identifier,
    "ticketID": wire_identifier,
    "parentActivity": wire_optional_identifier,
}
_DEFAULTS = Activity(id="0", ticket_id="0")
FIELD_BY_ALIAS = {field.alias or name: name for name, field in Activity.model_fields.items()}

EXTRA_FIELDS = st.dictionaries(
    st.sampled_from(["createdAt", "updatedAt", "ticketActivityStatus", "x-backend-rev"]),
    st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3),
    max_size=2,
)


@st.composite
def wire_activity_pairs(
    draw: st.DrawFn, activity: st.SearchStrategy[Activity] | None = None
) -> tuple[dict[str, Any], Activity]:
    """(activity dict in wire shape, the Activity it must parse to), in any accepted variant.

    Fields equal to their default are sometimes left out; unknown fields are sometimes added.
    """
    expected = draw(activity if activity is not None else activities())
    wire: dict[str, Any] = draw(EXTRA_FIELDS)
    for alias, encode in _ENCODERS.items():
        value = getattr(expected, FIELD_BY_ALIAS[alias])
        is_default = value == getattr(_DEFAULTS, FIELD_BY_ALIAS[alias])
        if alias not in ("id", "ticketID") and is_default and draw(st.booleans()):
            continue
        wire[alias] = draw(encode(value))
    return wire, expected


def wire_activities() -> st.SearchStrategy[dict[str, Any]]:
    """Valid activity dicts in wire shape (camelCase, preset/list/date variants)."""
    return wire_activity_pairs().map(lambda pair: pair[0])


def wire_events(
    activity: st.SearchStrategy[dict[str, Any]] | None = None,
) -> st.SearchStrategy[bytes]:
    """Structured-mode CloudEvent messages (bytes) carrying wire-shape activities."""
    return st.builds(
        lambda wire, kind: json.dumps(cloudevent_for(wire, type=kind)).encode(),
        activity if activity is not None else wire_activities(),
        st.sampled_from(["ticketActivity.created", "ticketActivity.updated"]),
    )
