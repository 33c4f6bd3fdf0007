"""Routing: one activity event to the notifications the policy calls for (pure, no I/O)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from typing import Any, NamedTuple

from service.core.directory import Contact, Directory, normalize_token
from service.core.events import Activity, ActivityEvent, Customer

# The date fields of an activity, in the order staff mail lists them.
DATE_FIELDS = (
    "activity_date",
    "response_received_date",
    "response_acknowledged_date",
    "action_taken_date",
    "action_required_date",
    "followup_date",
)


class Kind(StrEnum):
    """What a notification is, which decides its recipient, content and attachments."""

    CUSTOMER_CONTENT = "customer_content"
    CUSTOMER_UPDATE = "customer_update"
    STAFF = "staff"
    SUPPLIER = "supplier"
    FOLLOWUP_REMINDER = "followup_reminder"
    ACTION_REMINDER = "action_reminder"

    @property
    def reminder(self) -> bool:
        """Sent when a follow-up or action date comes (contract section 9), not when routed."""
        return self in (Kind.FOLLOWUP_REMINDER, Kind.ACTION_REMINDER)

    @property
    def internal(self) -> bool:
        """Only company staff receive it, so `commentText` may appear in it."""
        return self is Kind.STAFF or self.reminder


class Key(NamedTuple):
    """One notification: at most one mail is ever sent per key."""

    activity_id: str
    kind: str
    recipient: str
    """The address, lower-cased (an `unresolved` row holds the token instead)."""
    moment: str = ""
    """'' except for reminders: the due moment, ISO 8601 UTC."""


@dataclass(frozen=True, slots=True)
class CalendarEntry:
    """A reminder date an `.ics` attachment carries: kind, moment (aware) and SEQUENCE."""

    kind: Kind
    moment: dt.datetime
    sequence: int = 0

    def __reduce__(self) -> tuple[type[CalendarEntry], tuple[Kind, dt.datetime, int]]:
        return (CalendarEntry, (self.kind, self.moment, self.sequence))


@dataclass(frozen=True, slots=True)
class Notification:
    """One e-mail to one recipient: everything the renderer may show, and nothing more."""

    kind: Kind
    activity_id: str
    ticket_id: str
    ticket_reference: str
    ticket_subject: str
    customer_name: str
    parent_activity_id: str | None
    recipient: Contact
    activity_type: str | None = None
    author: str | None = None  # display name of activityUser (staff only)
    activity_text: str = ""  # customer_content, staff, supplier
    update_text: str = ""  # customer_update, staff
    comment_text: str = ""  # STAFF ONLY: "" for every other kind, always
    dates: tuple[tuple[str, dt.date | dt.datetime], ...] = ()
    action_required: dt.date | dt.datetime | None = None  # staff + supplier
    action_required_time: dt.time | None = None  # staff + supplier
    followup: dt.date | dt.datetime | None = None  # staff only
    followup_time: dt.time | None = None  # staff only
    attachments: tuple[str, ...] = ()  # store references to attach
    listed_attachments: tuple[str, ...] = ()  # staff: listed by name, never attached
    # The Message-ID of the parent activity's mail to this recipient, if one went out (the
    # dispatcher finds it in the ledger): a follow-up answers that very mail.
    in_reply_to: str | None = None
    moment: str = ""  # reminders: the due moment, ISO 8601 UTC (`moment_text`); "" otherwise
    calendar: tuple[CalendarEntry, ...] = ()  # staff: the dates its .ics attachment carries

    # At most one mail per (activity id, kind, recipient address, moment). The moment is ""
    # except for reminders, so a moved reminder is a new mail while a redelivered one is
    # not. Derived from the fields above, once: delivery reads it ~15 times per mail.
    key: Key = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = Key(self.activity_id, self.kind.value, self.recipient.email.lower(), self.moment)
        object.__setattr__(self, "key", key)

    def __reduce__(self) -> tuple[type[Notification], tuple[Any, ...]]:
        # As the constructor's arguments (the key is derived again): a render worker gets
        # a chunk of these, and a slots dataclass's default pickling runs in Python, on a
        # thread of the event loop's process (benchmarks/README.md, eighth round).
        return (Notification, _all_fields(self))

    def evolve(self, **changes: Any) -> Notification:
        """A copy with `changes` (what dataclasses.replace does, in half its time: routing
        makes several per activity)."""
        values = list(_all_fields(self))
        for name, value in changes.items():
            values[_FIELD_INDEX[name]] = value
        return Notification(*values)


_FIELD_NAMES = tuple(f.name for f in fields(Notification) if f.init)
_FIELD_INDEX = {name: i for i, name in enumerate(_FIELD_NAMES)}
_all_fields = attrgetter(*_FIELD_NAMES)


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A recipient the directory does not know (`field`: the activity field, or "customer").

    `kind` is the mail it would have got; for a missing customer, `token` is the ticket id.
    """

    field: str
    token: str
    kind: Kind = Kind.STAFF


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The operator's choices that routing depends on."""

    suppliers_may_receive_personal_data: bool = False


@dataclass(frozen=True, slots=True)
class RoutingResult:
    """What to send, what to hold back (personal data to suppliers), and whom we could not find."""

    notifications: tuple[Notification, ...]
    withheld: tuple[Notification, ...]
    unresolved: tuple[Unresolved, ...]


def route(event: ActivityEvent, directory: Directory, policy: RoutingPolicy) -> RoutingResult:
    """Apply the routing policy (contract section 2) to one event."""
    activity = event.data.activity
    unresolved: list[Unresolved] = []
    blank, customer = ticket_context(event, directory)
    notifications = [
        *_customer_notifications(activity, blank, customer, unresolved),
        *_staff_notifications(activity, blank, directory, unresolved),
    ]
    suppliers = _supplier_notifications(activity, blank, directory, unresolved)
    withheld: list[Notification] = []
    if activity.contains_personal_data and not policy.suppliers_may_receive_personal_data:
        withheld = suppliers
    else:
        notifications += suppliers
    return RoutingResult(tuple(notifications), tuple(withheld), tuple(dict.fromkeys(unresolved)))


def ticket_context(
    event: ActivityEvent, directory: Directory
) -> tuple[Notification, Customer | None]:
    """A notification with the ticket facts every kind shares, and no content; plus the customer.

    Ticket context comes from the event, field by field falling back to the directory.
    """
    activity = event.data.activity
    sent, known = event.data.ticket, directory.ticket(activity.ticket_id)
    customer = (sent.customer if sent else None) or (known.customer if known else None)
    reference = (sent.reference if sent else "") or (known.reference if known else "")
    subject = (sent.subject if sent else "") or (known.subject if known else "")
    blank = Notification(
        kind=Kind.STAFF,
        activity_id=activity.id,
        ticket_id=activity.ticket_id,
        ticket_reference=reference or activity.ticket_id,
        ticket_subject=subject,
        customer_name=customer.name if customer else "",
        parent_activity_id=activity.parent_activity,
        recipient=Contact(name="", email=""),
    )
    return blank, customer


def _customer_notifications(
    activity: Activity, blank: Notification, customer: Customer | None, unresolved: list[Unresolved]
) -> list[Notification]:
    wanted = []
    if activity.send_content_by_email and activity.activity_text.strip():
        wanted.append(
            blank.evolve(
                kind=Kind.CUSTOMER_CONTENT,
                activity_text=activity.activity_text,
                attachments=_unique(
                    activity.standard_ticket_attachments,
                    activity.this_ticket_attachments,
                    activity.invoice_attachments,  # invoices go to the customer only
                ),
            )
        )
    if activity.send_update_by_email and activity.update_text.strip():
        wanted.append(blank.evolve(kind=Kind.CUSTOMER_UPDATE, update_text=activity.update_text))
    if wanted and customer is None:
        unresolved.extend(Unresolved("customer", activity.ticket_id, n.kind) for n in wanted)
        return []
    if customer is None:
        return []
    recipient = Contact(customer.name or customer.email, customer.email, customer.locale)
    return [n.evolve(recipient=recipient) for n in wanted]


def _staff_notifications(
    activity: Activity, blank: Notification, directory: Directory, unresolved: list[Unresolved]
) -> list[Notification]:
    content = staff_content(activity, blank, directory)
    recipients = staff_recipients(activity, directory, unresolved, with_author=False)
    return [content.evolve(recipient=r) for r in recipients]


def staff_recipients(
    activity: Activity, directory: Directory, unresolved: list[Unresolved], *, with_author: bool
) -> list[Contact]:
    """The staff an activity reaches through activityDepartments and activityUsers, one
    contact per address, in order; unknown tokens go to `unresolved`.

    Staff mail leaves the author (activityUser) out: nobody is told of their own activity.
    Reminders (`with_author`) put the author first, when the directory knows them.
    """
    recipients = [
        *_resolve(
            "activityDepartments", activity.activity_departments, directory.department, unresolved
        ),
        *_resolve("activityUsers", activity.activity_users, directory.user, unresolved),
    ]
    author = directory.user(activity.activity_user) if activity.activity_user else None
    if with_author:
        return _by_address([author, *recipients] if author else recipients)
    is_author = _AuthorMatcher(activity.activity_user, author)
    return [r for r in _by_address(recipients) if not is_author(r)]


def staff_content(activity: Activity, blank: Notification, directory: Directory) -> Notification:
    """A staff notification of `activity` without its recipient: every field staff may see."""
    author = directory.user(activity.activity_user) if activity.activity_user else None
    return blank.evolve(
        kind=Kind.STAFF,
        activity_type=activity.ticket_activity_type,
        author=author.name if author else activity.activity_user,
        activity_text=activity.activity_text,
        update_text=activity.update_text,
        comment_text=activity.comment_text,
        dates=tuple(
            (name, value) for name in DATE_FIELDS if (value := getattr(activity, name)) is not None
        ),
        action_required=activity.action_required_date,
        action_required_time=activity.action_required_time,
        followup=activity.followup_date,
        followup_time=activity.followup_time,
        listed_attachments=_unique(
            activity.standard_ticket_attachments,
            activity.this_ticket_attachments,
            activity.invoice_attachments,
        ),
    )


def _supplier_notifications(
    activity: Activity, blank: Notification, directory: Directory, unresolved: list[Unresolved]
) -> list[Notification]:
    recipients = _resolve(
        "activitySuppliers", activity.activity_suppliers, directory.supplier, unresolved
    )
    required = activity.action_required_date
    content = blank.evolve(
        kind=Kind.SUPPLIER,
        customer_name="",  # the customer's name is personal data the supplier does not need
        activity_text=activity.activity_text,
        dates=(("action_required_date", required),) if required is not None else (),
        action_required=required,
        action_required_time=activity.action_required_time,
        # Invoices go to the customer only: an invoice reference is dropped even when it is
        # also listed among the standard or this-ticket attachments.
        attachments=tuple(
            ref
            for ref in _unique(
                activity.standard_ticket_attachments, activity.this_ticket_attachments
            )
            if ref not in activity.invoice_attachments
        ),
    )
    return [content.evolve(recipient=r) for r in _by_address(recipients)]


@dataclass(frozen=True, slots=True)
class _AuthorMatcher:
    """Recognises the activity's author among staff recipients: they are not notified.

    A known author is matched by address; an unknown token by address or display name.
    """

    token: str | None
    contact: Contact | None

    def __call__(self, recipient: Contact) -> bool:
        if self.contact is not None:
            return recipient.email.lower() == self.contact.email.lower()
        if not self.token:
            return False
        norm = normalize_token(self.token)
        return norm in (recipient.email.lower(), normalize_token(recipient.name))


def _resolve(
    field: str,
    tokens: Iterable[str],
    find: Callable[[str], Contact | tuple[Contact, ...] | None],
    unresolved: list[Unresolved],
) -> list[Contact]:
    """The contacts the tokens reach, in order; a token the directory does not know goes to
    `unresolved`, under the activity field it came from."""
    found: list[Contact] = []
    for token in tokens:
        contacts = find(token)
        if contacts is None:
            kind = Kind.SUPPLIER if field == "activitySuppliers" else Kind.STAFF
            unresolved.append(Unresolved(field, token, kind))
        elif isinstance(contacts, Contact):
            found.append(contacts)
        else:
            found.extend(contacts)
    return found


def _by_address(contacts: Iterable[Contact]) -> list[Contact]:
    """The first contact for each address (compared lower-cased), in order."""
    seen: dict[str, Contact] = {}
    for contact in contacts:
        seen.setdefault(contact.email.lower(), contact)
    return list(seen.values())


def _unique(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ref for group in groups for ref in group))
