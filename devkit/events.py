"""Events and notifications for tests and benchmarks: the examples, factories, publishing.

The example events live in examples/events/; `example()` stamps one with the current time
and overrides activity fields. `make_notification()` builds a Notification shaped the way
routing produces it, for any kind. `publish()` sends CloudEvents (structured mode) keyed
by ticket, as the producer side does.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from devkit import EXAMPLES
from devkit.topics import Headers, Record, produce
from service.core.directory import Contact, Directory
from service.core.events import STRUCTURED_CONTENT_TYPE, parse_event
from service.core.routing import Kind, Notification, RoutingPolicy, RoutingResult, route

CLOUDEVENT_HEADERS: Headers = (("content-type", STRUCTURED_CONTENT_TYPE.encode()),)

# --- CloudEvents ---------------------------------------------------------------------------


def event_time(at: float | None = None) -> str:
    """A CloudEvent `time` (RFC 3339, UTC, microseconds) for the epoch `at` (default: now)."""
    moment = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def stamped(event: Mapping[str, Any], at: float | None = None) -> dict[str, Any]:
    """A copy of the event whose `time` is `at` (default: now)."""
    return {**event, "time": event_time(at)}


def encode(event: Mapping[str, Any]) -> bytes:
    """The event as structured-mode JSON."""
    return json.dumps(event, ensure_ascii=False).encode()


def ticket_key(event: Mapping[str, Any]) -> bytes:
    """The Kafka key of an event: its activity's ticket id."""
    return str(event["data"]["activity"]["ticketID"]).encode()


def routing_of(
    value: bytes,
    headers: Mapping[str, bytes | str] | None = None,
    directory: Directory | None = None,
    policy: RoutingPolicy | None = None,
) -> RoutingResult:
    """What the service's parse and route make of a record (structured mode by default)."""
    event = parse_event(value, dict(CLOUDEVENT_HEADERS) if headers is None else headers)
    return route(event, directory or Directory.empty(), policy or RoutingPolicy())


async def publish(
    bootstrap: str,
    topic: str,
    events: Sequence[Mapping[str, Any] | bytes],
    key: bytes | None = None,
) -> list[tuple[int, int]]:
    """Publish CloudEvents (structured mode) keyed by their ticket id, in order.

    Raw bytes go as they are, keyed by `key` and without headers (poison, say).
    """
    records = [
        Record(key, event)
        if isinstance(event, bytes)
        else Record(key or ticket_key(event), encode(event), CLOUDEVENT_HEADERS)
        for event in events
    ]
    return await produce(bootstrap, topic, records)


# --- the examples --------------------------------------------------------------------------


def example_events() -> list[dict[str, Any]]:
    """Every example event, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted((EXAMPLES / "events").glob("*.json"))]


def example(name: str, **activity: Any) -> dict[str, Any]:
    """An example event with `time` set to now, its activity's dates moved by as many days
    (a follow-up a week after the example stays a week ahead, not in the past), and
    activity fields overridden."""
    original: dict[str, Any] = json.loads((EXAMPLES / "events" / name).read_text())
    event = stamped(original)
    written = dt.datetime.fromisoformat(original["time"].replace("Z", "+00:00")).date()
    shift = dt.datetime.now(dt.UTC).date() - written
    fields = event["data"]["activity"]
    for field, value in fields.items():
        if field.endswith("Date") and isinstance(value, str) and _DATE.fullmatch(value):
            fields[field] = (dt.date.fromisoformat(value) + shift).isoformat()
    fields.update(activity)
    return event


_DATE = re.compile(r"\d{4}-\d\d-\d\d")


def customer_mail_event(activity_id: str, **activity: Any) -> dict[str, Any]:
    """Example 01 reduced to its customer mail (no staff users or departments, no
    attachments) under `activity_id`, with `activity` fields on top."""
    plain = {
        "activityUsers": "",
        "activityDepartments": "",
        "standardTicketAttachments": "",
        "thisTicketAttachments": "",
        "invoiceAttachments": "",
    }
    return example("01-customer-content.json", **{**plain, "id": activity_id, **activity})


def mixed_examples() -> list[dict[str, Any]]:
    """Every kind of mail, one unknown department (unresolved) and one supplier mail with
    personal data (withheld): the example events that exercise every label."""
    return [
        example("01-customer-content.json"),
        example("02-customer-update-directory-ticket.json"),
        example("03-staff-note.json", activityDepartments="support; no-such-department"),
        example("04-supplier-request.json"),
        example("06-updated.json"),
        example("07-supplier-personal-data.json"),
    ]


# --- notifications -------------------------------------------------------------------------

CUSTOMER = Contact(name="Dana Smith", email="dana@customer.test", locale="de")
STAFF = Contact(name="Bob Lee", email="bob@helpdesk.test", locale="de")
SUPPLIER = Contact(name="ACME Parts", email="orders@acme.test", locale="en")


# What staff mail and reminders (which carry staff mail's content) show by default.
_STAFF_CONTENT: dict[str, Any] = {
    "recipient": STAFF,
    "activity_type": "E-mail",
    "author": "Alice Jones",
    "activity_text": "The technician comes on Monday.",
    "update_text": "Your ticket is in progress.",
    "comment_text": "Customer is on the VIP list.",
}


def _defaults(kind: Kind) -> dict[str, Any]:
    """Fields routing would fill for `kind` (contract §2); texts a kind must not carry stay ""."""
    base: dict[str, Any] = {
        "kind": kind,
        "activity_id": "5001",
        "ticket_id": "1042",
        "ticket_reference": "T-1042",
        "ticket_subject": "Printer on floor 3 jams",
        "customer_name": "Dana Smith",
        "parent_activity_id": None,
        "recipient": CUSTOMER,
    }
    if kind is Kind.CUSTOMER_CONTENT:
        base.update(activity_text="The technician comes on Monday.")
    elif kind is Kind.CUSTOMER_UPDATE:
        base.update(update_text="Your ticket is in progress.")
    elif kind is Kind.STAFF:
        base.update(
            **_STAFF_CONTENT,
            dates=(
                ("activity_date", dt.datetime(2026, 11, 27, 9, 15, tzinfo=dt.UTC)),
                ("action_required_date", dt.date(2026, 12, 1)),
                ("followup_date", dt.date(2026, 12, 3)),
            ),
            action_required=dt.date(2026, 12, 1),
            action_required_time=dt.time(14, 30),
            followup=dt.date(2026, 12, 3),
            followup_time=dt.time(9, 0),
            listed_attachments=("standard/terms.pdf", "1042/photo.jpg", "invoices/R-77.pdf"),
        )
    elif kind.reminder:
        # As reminder_notifications builds them: staff content, the moment, and the due date
        # shown as the moment in the configured zone (here Europe/Berlin, UTC+01:00).
        due = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
        base.update(
            **_STAFF_CONTENT,
            moment="2026-12-03T08:00:00Z",
            **(
                {"followup": due}
                if kind is Kind.FOLLOWUP_REMINDER
                else {"action_required": due, "followup": dt.date(2026, 12, 5)}
            ),
        )
    elif kind is Kind.SUPPLIER:
        base.update(
            recipient=SUPPLIER,
            activity_text="Please send a replacement fuser unit.",
            dates=(("action_required_date", dt.date(2026, 12, 1)),),
            action_required=dt.date(2026, 12, 1),
            action_required_time=dt.time(14, 30),
            attachments=("standard/terms.pdf", "1042/photo.jpg"),
        )
    return base


def make_notification(kind: Kind = Kind.CUSTOMER_CONTENT, **overrides: Any) -> Notification:
    """A Notification of `kind` with realistic defaults; any field may be overridden.

    Two conveniences: `locale=` and `email=` replace just that part of the recipient.
    """
    fields = _defaults(Kind(kind))
    recipient: Contact = overrides.pop("recipient", fields["recipient"])
    if "locale" in overrides or "email" in overrides:
        recipient = Contact(
            name=recipient.name,
            email=overrides.pop("email", recipient.email),
            locale=overrides.pop("locale", recipient.locale),
        )
    fields.update(overrides, recipient=recipient)
    return Notification(**fields)
