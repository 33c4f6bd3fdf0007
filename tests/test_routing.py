"""Tests of service.core.routing: the policy table and every hard rule of contract section 2."""

from __future__ import annotations

import dataclasses
import datetime as dt
import pickle
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.directory import Contact, Directory, normalize_token
from service.core.events import Activity, ActivityEvent
from service.core.routing import (
    CalendarEntry,
    Kind,
    Notification,
    RoutingPolicy,
    Unresolved,
    route,
)
from tests.strategies import activities, activity_events, texts

DIRECTORY = Directory.from_mapping(
    {
        "departments": {
            "support": {"name": "Customer Support", "members": ["alice", "bob"]},
            "ops": {
                "name": "Operations",
                "members": ["bob", "carol"],
                "email": "ops@helpdesk.test",
            },
            "billing": {"name": "Billing", "email": "billing@helpdesk.test", "locale": "de"},
        },
        "users": {
            "alice": {"name": "Alice Jones", "email": "alice@helpdesk.test", "locale": "en"},
            "bob": {"name": "Bob Lee", "email": "Bob@Helpdesk.test", "locale": "de"},
            "carol": {"name": "Carol Weber", "email": "carol@helpdesk.test", "locale": "de"},
            "dana-staff": {"name": "Dana (staff)", "email": "dana@customer.test"},
        },
        "suppliers": {
            "acme": {"name": "ACME Parts", "email": "orders@acme.test"},
            "druckhaus": {"name": "Druckhaus", "email": "service@druckhaus.test", "locale": "de"},
        },
        "tickets": {
            "1042": {
                "reference": "T-1042",
                "subject": "Printer on floor 3 jams",
                "customer": {"name": "Dana Smith", "email": "dana@customer.test", "locale": "de"},
            },
            "1043": {"reference": "T-1043", "subject": "No customer on file"},
        },
    }
)
ALLOW = RoutingPolicy(suppliers_may_receive_personal_data=True)
STANDARD, QUOTE, INVOICE = (
    "standard/terms.pdf",
    "tickets/1042/quote.pdf",
    "invoices/INV-2026-001.pdf",
)
CUSTOMER_KINDS = (Kind.CUSTOMER_CONTENT, Kind.CUSTOMER_UPDATE)


def event(ticket: dict[str, Any] | None = None, **activity: Any) -> ActivityEvent:
    data: dict[str, Any] = {"activity": {"id": "5001", "ticketID": "1042", **activity}}
    if ticket is not None:
        data["ticket"] = ticket
    return ActivityEvent.model_validate(
        {
            "specversion": "1.0",
            "id": "e-1",
            "source": "/t",
            "type": "ticketActivity.created",
            "data": data,
        }
    )


def everything(**overrides: Any) -> ActivityEvent:
    """An activity that triggers every kind, with every attachment kind and a comment."""
    fields: dict[str, Any] = {
        "activityUser": "alice",
        "ticketActivityType": "E-mail",
        "activityText": "Your quote is attached.",
        "sendContentByEmail": "Yes",
        "updateText": "Technician booked for Tuesday.",
        "sendUpdateByEmail": "Yes",
        "commentText": "INTERNAL: goodwill discount approved",
        "activityDepartments": "support",
        "activityUsers": "carol",
        "activitySuppliers": "acme",
        "standardTicketAttachments": STANDARD,
        "thisTicketAttachments": QUOTE,
        "invoiceAttachments": INVOICE,
        "activityDate": "2026-11-27",
        "actionRequiredDate": "2026-12-01",
        "actionRequiredTime": "14:30",
        "followupDate": "2026-12-04",
        "followupTime": "10:00",
    }
    return event(**{**fields, **overrides})


def by_kind(notifications: tuple[Notification, ...], kind: Kind) -> list[Notification]:
    return [n for n in notifications if n.kind is kind]


def addresses(notifications: list[Notification]) -> list[str]:
    return [n.recipient.email for n in notifications]


# --- the policy table ----------------------------------------------------------------------


def test_customer_content_goes_to_the_ticket_customer_with_all_attachments() -> None:
    [mail] = by_kind(route(everything(), DIRECTORY, ALLOW).notifications, Kind.CUSTOMER_CONTENT)
    assert mail.recipient == Contact("Dana Smith", "dana@customer.test", "de")
    assert mail.activity_text == "Your quote is attached."
    assert (mail.update_text, mail.comment_text, mail.dates, mail.listed_attachments) == (
        "",
        "",
        (),
        (),
    )
    assert mail.attachments == (STANDARD, QUOTE, INVOICE)
    assert (mail.ticket_reference, mail.ticket_subject) == ("T-1042", "Printer on floor 3 jams")


@pytest.mark.parametrize(
    ("flag", "text"), [("No", "Hello"), ("Yes", ""), ("Yes", "  \n "), (None, "Hello")]
)
def test_customer_content_needs_the_flag_and_a_text(flag: Any, text: str) -> None:
    result = route(event(sendContentByEmail=flag, activityText=text), DIRECTORY, ALLOW)
    assert result.notifications == ()
    assert result.unresolved == ()


def test_customer_update_carries_only_the_update_text_and_no_attachments() -> None:
    [mail] = by_kind(route(everything(), DIRECTORY, ALLOW).notifications, Kind.CUSTOMER_UPDATE)
    assert mail.update_text == "Technician booked for Tuesday."
    assert (mail.activity_text, mail.comment_text, mail.attachments) == ("", "", ())
    blank = route(everything(updateText=" \n"), DIRECTORY, ALLOW).notifications
    assert Kind.CUSTOMER_UPDATE not in [n.kind for n in blank]
    kinds = [
        n.kind for n in route(everything(sendUpdateByEmail="N"), DIRECTORY, ALLOW).notifications
    ]
    assert Kind.CUSTOMER_UPDATE not in kinds


def test_deduplicates_attachments_keeping_order() -> None:
    result = route(everything(thisTicketAttachments=[QUOTE, STANDARD, QUOTE]), DIRECTORY, ALLOW)
    [mail] = by_kind(result.notifications, Kind.CUSTOMER_CONTENT)
    assert mail.attachments == (STANDARD, QUOTE, INVOICE)


def test_staff_mail_carries_everything_and_lists_attachments_without_attaching() -> None:
    staff = by_kind(route(everything(), DIRECTORY, ALLOW).notifications, Kind.STAFF)
    assert addresses(staff) == ["Bob@Helpdesk.test", "carol@helpdesk.test"]
    mail = staff[0]
    assert (mail.activity_type, mail.author) == ("E-mail", "Alice Jones")
    assert mail.activity_text == "Your quote is attached."
    assert mail.comment_text == "INTERNAL: goodwill discount approved"
    assert mail.update_text == "Technician booked for Tuesday."
    assert mail.dates == (
        ("activity_date", dt.date(2026, 11, 27)),
        ("action_required_date", dt.date(2026, 12, 1)),
        ("followup_date", dt.date(2026, 12, 4)),
    )
    assert (mail.action_required, mail.action_required_time) == (
        dt.date(2026, 12, 1),
        dt.time(14, 30),
    )
    assert (mail.followup, mail.followup_time) == (dt.date(2026, 12, 4), dt.time(10, 0))
    assert mail.attachments == ()
    assert mail.listed_attachments == (STANDARD, QUOTE, INVOICE)
    assert mail.customer_name == "Dana Smith"


def test_staff_mail_is_sent_even_without_texts() -> None:
    result = route(event(activityUsers="bob"), DIRECTORY, ALLOW)
    assert addresses(list(result.notifications)) == ["Bob@Helpdesk.test"]


def test_department_with_only_a_mailbox_notifies_that_mailbox() -> None:
    staff = by_kind(
        route(event(activityDepartments="Billing"), DIRECTORY, ALLOW).notifications, Kind.STAFF
    )
    assert [n.recipient for n in staff] == [Contact("Billing", "billing@helpdesk.test", "de")]


def test_supplier_mail_carries_the_text_and_action_required_date_only() -> None:
    [mail] = by_kind(route(everything(), DIRECTORY, ALLOW).notifications, Kind.SUPPLIER)
    assert mail.recipient == Contact("ACME Parts", "orders@acme.test", "en")
    assert mail.activity_text == "Your quote is attached."
    assert (mail.comment_text, mail.update_text, mail.author, mail.customer_name) == (
        "",
        "",
        None,
        "",
    )
    assert mail.dates == (("action_required_date", dt.date(2026, 12, 1)),)
    assert (mail.action_required, mail.action_required_time) == (
        dt.date(2026, 12, 1),
        dt.time(14, 30),
    )
    assert (mail.followup, mail.followup_time) == (None, None)
    assert mail.attachments == (STANDARD, QUOTE)


def test_notification_locale_is_the_recipients() -> None:
    result = route(everything(activityUsers="alice", activityUser=None), DIRECTORY, ALLOW)
    locales = {n.recipient.email: n.recipient.locale for n in result.notifications}
    assert locales == {
        "dana@customer.test": "de",
        "alice@helpdesk.test": "en",
        "Bob@Helpdesk.test": "de",
        "orders@acme.test": "en",
    }


# --- ticket context ------------------------------------------------------------------------


def test_ticket_context_from_the_event_wins_over_the_directory() -> None:
    ticket = {
        "reference": "T-X",
        "subject": "From the event",
        "customer": {"name": "Eve", "email": "eve@customer.test", "locale": "en"},
    }
    [mail] = by_kind(
        route(everything(ticket=ticket), DIRECTORY, ALLOW).notifications, Kind.CUSTOMER_CONTENT
    )
    assert mail.recipient == Contact("Eve", "eve@customer.test", "en")
    assert (mail.ticket_reference, mail.ticket_subject, mail.customer_name) == (
        "T-X",
        "From the event",
        "Eve",
    )


def test_ticket_context_falls_back_to_the_directory_field_by_field() -> None:
    [mail] = by_kind(
        route(everything(ticket={"subject": "Only a subject"}), DIRECTORY, ALLOW).notifications,
        Kind.CUSTOMER_CONTENT,
    )
    assert (mail.ticket_reference, mail.ticket_subject) == ("T-1042", "Only a subject")
    assert mail.recipient.email == "dana@customer.test"


def test_unknown_ticket_uses_its_id_as_reference() -> None:
    result = route(everything(ticketID="7777"), DIRECTORY, ALLOW)
    assert {(n.ticket_reference, n.ticket_subject) for n in result.notifications} == {("7777", "")}


@pytest.mark.parametrize("ticket_id", ["7777", "1043"])
def test_missing_customer_is_unresolved_and_the_rest_still_notified(ticket_id: str) -> None:
    result = route(everything(ticketID=ticket_id), DIRECTORY, ALLOW)
    assert result.unresolved == (
        Unresolved("customer", ticket_id, Kind.CUSTOMER_CONTENT),
        Unresolved("customer", ticket_id, Kind.CUSTOMER_UPDATE),
    )
    assert {n.kind for n in result.notifications} == {Kind.STAFF, Kind.SUPPLIER}


def test_follow_up_carries_its_parent_activity() -> None:
    result = route(everything(parentActivity=4999), DIRECTORY, ALLOW)
    assert {n.parent_activity_id for n in result.notifications} == {"4999"}


# --- hard rules (contract section 2), one test each ----------------------------------------


def test_comment_text_is_internal_and_appears_only_in_staff_mail() -> None:
    result = route(everything(), DIRECTORY, ALLOW)
    comment = "INTERNAL: goodwill discount approved"
    assert {n.kind for n in result.notifications} == {k for k in Kind if not k.reminder}
    for mail in result.notifications:
        if mail.kind is Kind.STAFF:
            assert mail.comment_text == comment
        else:
            assert mail.comment_text == ""
            assert comment not in list(strings(mail))


def test_invoices_go_to_the_customer_only() -> None:
    both = [STANDARD, INVOICE]  # an invoice also listed as standard is still an invoice
    result = route(everything(standardTicketAttachments=both), DIRECTORY, ALLOW)
    for mail in result.notifications:
        assert (INVOICE in mail.attachments) is (mail.kind is Kind.CUSTOMER_CONTENT)


@pytest.mark.parametrize(
    "author", ["bob", "Bob Lee", "  BOB lee ", "bob@helpdesk.test", {"id": 7, "name": "Bob Lee"}]
)
def test_the_staff_user_in_activity_user_is_not_notified_of_their_own_activity(author: Any) -> None:
    # Bob is reached twice: through the support department and by name.
    result = route(
        event(activityUser=author, activityDepartments="support", activityUsers="Bob Lee"),
        DIRECTORY,
        ALLOW,
    )
    assert addresses(list(result.notifications)) == ["alice@helpdesk.test"]


def test_an_author_unknown_to_the_directory_is_matched_by_address() -> None:
    result = route(
        event(activityUser="x@elsewhere.test", activityUsers="x@ELSEWHERE.test, carol"),
        DIRECTORY,
        ALLOW,
    )
    assert addresses(list(result.notifications)) == ["carol@helpdesk.test"]


def test_one_address_gets_at_most_one_staff_mail_per_activity() -> None:
    result = route(
        event(
            activityDepartments="support; Operations; ops@helpdesk.test",
            activityUsers="bob, Bob Lee, bob@helpdesk.test, BOB@HELPDESK.TEST",
        ),
        DIRECTORY,
        ALLOW,
    )
    assert addresses(list(result.notifications)) == [
        "alice@helpdesk.test",
        "Bob@Helpdesk.test",
        "carol@helpdesk.test",
        "ops@helpdesk.test",
    ]


def test_personal_data_withholds_supplier_mail_by_default() -> None:
    result = route(everything(containsPersonalData="Yes"), DIRECTORY, RoutingPolicy())
    assert Kind.SUPPLIER not in {n.kind for n in result.notifications}
    assert [(n.kind, n.recipient.email) for n in result.withheld] == [
        (Kind.SUPPLIER, "orders@acme.test")
    ]
    assert {n.kind for n in result.notifications} == {Kind.STAFF, *CUSTOMER_KINDS}


def test_personal_data_reaches_suppliers_when_the_operator_allows_it() -> None:
    result = route(everything(containsPersonalData="Yes"), DIRECTORY, ALLOW)
    assert result.withheld == ()
    assert addresses(by_kind(result.notifications, Kind.SUPPLIER)) == ["orders@acme.test"]
    no_personal_data = route(everything(containsPersonalData="No"), DIRECTORY, RoutingPolicy())
    assert no_personal_data.withheld == ()


def test_a_token_that_is_an_email_address_is_used_as_it_is() -> None:
    result = route(
        event(
            activityDepartments="team@partner.test",
            activityUsers="temp@helpdesk.test",
            activitySuppliers="sales@vendor.test",
        ),
        DIRECTORY,
        ALLOW,
    )
    assert [(n.kind, n.recipient) for n in result.notifications] == [
        (Kind.STAFF, Contact("team@partner.test", "team@partner.test", "en")),
        (Kind.STAFF, Contact("temp@helpdesk.test", "temp@helpdesk.test", "en")),
        (Kind.SUPPLIER, Contact("sales@vendor.test", "sales@vendor.test", "en")),
    ]
    assert result.unresolved == ()


def test_addresses_the_directory_knows_show_the_persons_name() -> None:
    result = route(
        event(
            activityUser="ALICE@helpdesk.test",
            activityDepartments="billing@helpdesk.test",
            activityUsers="carol@helpdesk.test",
            activitySuppliers="service@druckhaus.test",
        ),
        DIRECTORY,
        ALLOW,
    )
    assert [(n.kind, n.recipient, n.author) for n in result.notifications] == [
        (Kind.STAFF, Contact("Billing", "billing@helpdesk.test", "de"), "Alice Jones"),
        (Kind.STAFF, Contact("Carol Weber", "carol@helpdesk.test", "de"), "Alice Jones"),
        (Kind.SUPPLIER, Contact("Druckhaus", "service@druckhaus.test", "de"), None),
    ]
    # An address nobody in the directory has is all there is to show.
    [mail] = route(
        event(activityUser="x@elsewhere.test", activityUsers="carol"), DIRECTORY, ALLOW
    ).notifications
    assert mail.author == "x@elsewhere.test"


def test_unknown_tokens_are_unresolved_and_the_other_recipients_still_notified() -> None:
    result = route(
        event(
            activityDepartments="sales, support",
            activityUsers="mallory; carol; mallory",
            activitySuppliers="ghost, acme",
        ),
        DIRECTORY,
        ALLOW,
    )
    assert result.unresolved == (
        Unresolved("activityDepartments", "sales"),
        Unresolved("activityUsers", "mallory"),
        Unresolved("activitySuppliers", "ghost", Kind.SUPPLIER),
    )
    assert addresses(list(result.notifications)) == [
        "alice@helpdesk.test",
        "Bob@Helpdesk.test",
        "carol@helpdesk.test",
        "orders@acme.test",
    ]


def test_at_most_once_per_activity_kind_and_address() -> None:
    # Dana is the customer and also staff: one mail per kind, keyed by (activity, kind, address).
    result = route(everything(activityUsers="dana-staff, DANA@customer.test"), DIRECTORY, ALLOW)
    keys = [n.key for n in result.notifications]
    assert len(keys) == len(set(keys))
    dana = [
        n.kind for n in result.notifications if n.recipient.email.lower() == "dana@customer.test"
    ]
    assert dana == [Kind.CUSTOMER_CONTENT, Kind.CUSTOMER_UPDATE, Kind.STAFF]
    # An update of the same activity yields the same keys, so the ledger can skip what was sent.
    updated = everything(activityUsers="dana-staff", activityText="Edited text")
    assert {n.key for n in route(updated, DIRECTORY, ALLOW).notifications} <= set(keys)


def test_notification_key_is_activity_kind_and_lowercased_address() -> None:
    [mail] = route(event(activityUsers="bob"), DIRECTORY, ALLOW).notifications
    assert mail.key == ("5001", "staff", "bob@helpdesk.test", "")


# --- properties ----------------------------------------------------------------------------

MARK = "\u2603"  # never in generated texts, so a comment carrying it cannot appear by chance
DEPARTMENTS = st.sampled_from(
    ["support", "Customer Support", "ops", "billing", "x@ext.test", "sales"]
)
USERS = st.sampled_from(
    ["alice", "Bob Lee", "bob@helpdesk.test", "carol", "dana-staff", "x@ext.test", "nobody"]
)
SUPPLIERS = st.sampled_from(["acme", "Druckhaus", "s@ext.test", "ghost"])
AUTHORS = st.sampled_from(
    [None, "alice", "Bob Lee", "BOB@helpdesk.test", "x@ext.test", "stranger", "Carol Weber"]
)


def routable(comments: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[ActivityEvent]:
    chosen = activities(
        departments=DEPARTMENTS,
        users=USERS,
        suppliers=SUPPLIERS,
        authors=AUTHORS,
        text=texts(st.characters(codec="utf-8", exclude_characters=MARK)),
        comments=comments,
        ticket_id="1042",
    )
    return activity_events(chosen) | activity_events(
        chosen.map(lambda a: a.model_copy(update={"ticket_id": "9"}))
    )


def strings(value: Any) -> Iterator[str]:
    """Every string inside a notification (recursing into contacts, tuples and dates)."""
    if isinstance(value, str):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from strings(getattr(value, field.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from strings(item)
    elif value is not None:
        yield str(value)


def all_of(result: Any) -> list[Notification]:
    return [*result.notifications, *result.withheld]


@given(routable(comments=st.uuids().map(lambda u: f"{MARK}internal-{u.hex}")), st.booleans())
def test_property_no_customer_or_supplier_mail_carries_the_comment(
    e: ActivityEvent, allow: bool
) -> None:
    comment = e.data.activity.comment_text
    for mail in all_of(route(e, DIRECTORY, RoutingPolicy(allow))):
        if mail.kind is not Kind.STAFF:
            assert mail.comment_text == ""
            assert not any(comment in text for text in strings(mail))


@given(routable(), st.booleans())
def test_property_comment_text_is_empty_outside_staff_mail(e: ActivityEvent, allow: bool) -> None:
    for mail in all_of(route(e, DIRECTORY, RoutingPolicy(allow))):
        assert mail.comment_text == "" or mail.kind is Kind.STAFF


@given(routable(), st.booleans())
def test_property_invoices_are_never_in_supplier_or_staff_attachments(
    e: ActivityEvent, allow: bool
) -> None:
    invoices = set(e.data.activity.invoice_attachments)
    for mail in all_of(route(e, DIRECTORY, RoutingPolicy(allow))):
        if mail.kind is not Kind.CUSTOMER_CONTENT:
            assert not invoices & set(mail.attachments)


@given(routable())
def test_property_at_most_one_staff_mail_per_address(e: ActivityEvent) -> None:
    staff = by_kind(route(e, DIRECTORY, ALLOW).notifications, Kind.STAFF)
    counts = Counter(n.recipient.email.lower() for n in staff)
    assert all(count == 1 for count in counts.values())


@given(routable())
def test_property_keys_are_unique_within_a_result(e: ActivityEvent) -> None:
    keys = [n.key for n in all_of(route(e, DIRECTORY, RoutingPolicy()))]
    assert len(keys) == len(set(keys))


@given(routable())
def test_property_the_author_is_never_notified(e: ActivityEvent) -> None:
    token = e.data.activity.activity_user
    staff = by_kind(route(e, DIRECTORY, ALLOW).notifications, Kind.STAFF)
    if token is None:
        return
    author = DIRECTORY.user(token)
    for mail in staff:
        if author is not None:
            assert mail.recipient.email.lower() != author.email.lower()
        assert normalize_token(token) not in (
            mail.recipient.email.lower(),
            normalize_token(mail.recipient.name),
        )


@given(routable(), st.booleans())
def test_property_personal_data_never_reaches_suppliers_unless_allowed(
    e: ActivityEvent, allow: bool
) -> None:
    result = route(e, DIRECTORY, RoutingPolicy(allow))
    sent_to_suppliers = by_kind(result.notifications, Kind.SUPPLIER)
    if e.data.activity.contains_personal_data and not allow:
        assert sent_to_suppliers == []
    else:
        assert result.withheld == ()
    assert all(n.kind is Kind.SUPPLIER for n in result.withheld)


def test_route_is_pure_and_deterministic() -> None:
    e = everything()
    assert route(e, DIRECTORY, ALLOW) == route(e, DIRECTORY, ALLOW)
    assert isinstance(e.data.activity, Activity)


def test_evolve_is_dataclasses_replace() -> None:
    from devkit.events import make_notification

    n = make_notification(Kind.STAFF)
    contact = Contact(name="Other", email="other@x.test", locale="de")
    for changes in ({}, {"recipient": contact}, {"kind": Kind.SUPPLIER, "moment": "m"}):
        assert n.evolve(**changes) == dataclasses.replace(n, **changes)
    with pytest.raises(KeyError):
        n.evolve(no_such_field=1)


@given(routable(), st.booleans())
def test_property_notifications_cross_to_a_worker_unchanged(e: ActivityEvent, allow: bool) -> None:
    # A render worker gets its chunk pickled (Notification.__reduce__: the constructor's
    # arguments, the key derived again); staff mail with calendar entries too.
    entry = CalendarEntry(Kind.FOLLOWUP_REMINDER, dt.datetime(2026, 12, 1, 9, tzinfo=dt.UTC), 2)
    mails = [
        n.evolve(calendar=(entry,)) if n.kind is Kind.STAFF else n
        for n in all_of(route(e, DIRECTORY, RoutingPolicy(allow)))
    ]
    back = pickle.loads(pickle.dumps(mails, 5))
    assert back == mails
    assert [n.key for n in back] == [n.key for n in mails]
    assert all(type(n.recipient) is Contact for n in back)
