"""Test factories: notifications shaped the way routing produces them, for any kind."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.core.directory import Contact
from service.core.routing import Kind, Notification

CUSTOMER = Contact(name="Dana Smith", email="dana@customer.test", locale="de")
STAFF = Contact(name="Bob Lee", email="bob@helpdesk.test", locale="de")
SUPPLIER = Contact(name="ACME Parts", email="orders@acme.test", locale="en")


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
            recipient=STAFF,
            activity_type="E-mail",
            author="Alice Jones",
            activity_text="The technician comes on Monday.",
            update_text="Your ticket is in progress.",
            comment_text="Customer is on the VIP list.",
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
            recipient=STAFF,
            activity_type="E-mail",
            author="Alice Jones",
            activity_text="The technician comes on Monday.",
            update_text="Your ticket is in progress.",
            comment_text="Customer is on the VIP list.",
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
