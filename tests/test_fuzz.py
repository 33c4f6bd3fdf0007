"""Fuzzing parse → route → render → message with random, hostile and mutated events.

Properties, for any input:
- `parse_event` raises nothing but `InvalidEvent` (whose reason is one line);
- for an event it accepts, routing, rendering and MIME assembly raise nothing;
- every built message, parsed back by the stdlib (policy.default, which decodes RFC 2047
  words), has no header value holding CR or LF, exactly one To (the notification's
  recipient, one address), no Cc or Bcc, one From/Subject/Date/Message-ID, the
  deterministic Message-ID, and a raw header block of well-formed CRLF lines.
"""

from __future__ import annotations

import copy
import email
import email.policy
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.core.directory import Contact, load_directory
from service.core.events import ActivityEvent, InvalidEvent, cloudevent_for, parse_event
from service.core.fields import looks_like_email
from service.core.message import Attachment, build_message, message_id
from service.core.mime import addr_spec
from service.core.render import Renderer
from service.core.routing import Kind, Notification, RoutingPolicy, route
from service.delivery.attachments import guess_type
from service.delivery.smtp_wire import dot_stuff
from service.runtime.settings import default_templates_dir
from tests.strategies import activities, activity_events, texts, wire_activity_pairs, wire_events

EXAMPLES = Path(__file__).parent.parent / "examples"
DIRECTORY = load_directory(EXAMPLES / "directory.yaml")
RENDERER = Renderer(default_templates_dir())
SENDER = "Helpdesk Team <helpdesk@helpdesk.test>"
REPLY_TO = "support@helpdesk.test"
DOMAIN = "helpdesk.test"
WHEN = datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
STAGES = {"decode", "cloudevent", "type", "activity"}
CONTENT_TYPE = {"content-type": b"application/cloudevents+json"}

# Examples per test, deadline and slowness checks come from the profile (tests/conftest.py).
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Strings that try to break out of a header, smuggle a recipient or confuse a decoder.
INJECTIONS = (
    "\r\nBcc: victim@evil.test",
    "\nBcc: victim@evil.test",
    "\rCc: victim@evil.test",
    "\r\n\r\n<html>body</html>",
    "\x00",
    "\x00Bcc: victim@evil.test",
    "=?UTF-8?Q?=0A?=Bcc: victim@evil.test",
    "=?utf-8?q?=0D=0ABcc:_victim@evil.test?=",
    "=?utf-8?b?DQpCY2M6IHhAZXZpbC50ZXN0?=",
    "\u2028Bcc: victim@evil.test",
    "\u2029",
    "\x85Bcc: x@evil.test",
    "\x0b\x0c\t",
    "\x1b[31m",
    '"quoted \\" name" <evil@evil.test>',
    "a@evil.test, b@evil.test",
    "Name <other@evil.test>",
    "ä ö ü 🎉 中文",
    "%0d%0aBcc: x@evil.test",
    "x" * 300,
    "word " * 60,
    "",
    " ",
)


def hostile() -> st.SearchStrategy[str]:
    """Text mixing injection attempts with random characters."""
    piece = st.sampled_from(INJECTIONS) | st.text(max_size=12)
    return st.lists(piece, min_size=1, max_size=4).map("".join)


# --- the pipeline under test ---------------------------------------------------------------


def attachments_for(n: Notification) -> list[Attachment]:
    """What the attachment store would load for n's references (name = last path part)."""
    out = []
    for ref in n.attachments:
        if not ref or "\0" in ref:  # refused by the store before anything is read
            continue
        name = PurePosixPath(ref.replace("\\", "/")).name
        out.append(Attachment(name, guess_type(name), b"%PDF-1.4 fuzz\x00\xff"))
    return out


def deliver(event: ActivityEvent) -> int:
    """Route, render and build every mail of `event`, withheld ones too; check each message."""
    built = 0
    result = route(event, DIRECTORY, RoutingPolicy())
    for n in (*result.notifications, *result.withheld):
        build_and_check(n)
        built += 1
    return built


def build_and_check(n: Notification, sender: str = SENDER) -> None:
    """Render and build one mail, then check the message."""
    mail, files = RENDERER.render(n), attachments_for(n)

    def build(dot_stuffed: bool) -> bytes:
        return build_message(
            n,
            mail,
            sender=sender,
            reply_to=REPLY_TO,
            domain=DOMAIN,
            attachments=files,
            date=WHEN,
            dot_stuffed=dot_stuffed,
        )

    data = build(dot_stuffed=False)
    check_message(data, n)
    # What a render worker hands the SMTP pool: only the bodies stuffed, yet the same bytes
    # as the whole message stuffed.
    assert build(dot_stuffed=True) == dot_stuff(data)


def parse_or_none(value: bytes | None, headers: Mapping[str, bytes | str]) -> ActivityEvent | None:
    """parse_event, asserting that it fails only with a one-line InvalidEvent."""
    try:
        return parse_event(value, headers)
    except InvalidEvent as exc:
        invalid = exc
    except Exception as exc:  # pragma: no cover - the property under test
        pytest.fail(f"parse_event raised {type(exc).__name__}: {exc!r}")
    assert invalid.stage in STAGES, invalid.stage
    assert not has_breaks(invalid.reason), invalid.reason
    return None


def has_breaks(text: str) -> bool:
    """Whether `text` holds CR, LF or NUL."""
    return any(ch in text for ch in "\r\n\x00")


def pipeline(value: bytes | None, headers: Mapping[str, bytes | str]) -> int:
    event = parse_or_none(value, headers)
    return 0 if event is None else deliver(event)


_HEADER_LINE = re.compile(rb"[!-9;-~]+:[ \t]?[\x20-\x7e\t]*|[ \t][\x20-\x7e\t]*")


def check_message(data: bytes, n: Notification) -> None:
    head, sep, _ = data.partition(b"\r\n\r\n")
    assert sep, "no blank line between header and body"
    lines = head.split(b"\r\n")
    for line in lines:
        # Only CRLF ends a line; only printable ASCII (and tabs) inside it.
        assert _HEADER_LINE.fullmatch(line), f"malformed header line {line[:120]!r}"
    names = [line.split(b":", 1)[0].lower() for line in lines if line[:1] not in (b" ", b"\t")]
    for name in (b"to", b"from", b"subject", b"date", b"message-id"):
        assert names.count(name) == 1, f"{names.count(name)} {name!r} headers: {names}"
    assert b"cc" not in names, names
    assert b"bcc" not in names, names

    msg = email.message_from_bytes(data, _class=EmailMessage, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        for name, value in part.items():
            text = str(value)
            assert not has_breaks(text), f"{name}: {text[:200]!r}"
        filename = part.get_filename()
        if filename is not None:
            assert not has_breaks(filename), repr(filename)
    assert msg.get_all("Cc") is None
    assert msg.get_all("Bcc") is None
    to = msg.get_all("To") or []
    assert len(to) == 1, to
    addresses = to[0].addresses
    assert len(addresses) == 1, f"To holds {len(addresses)} addresses: {str(to[0])!r}"
    assert addresses[0].addr_spec.lower() == addr_spec(n.recipient.email).lower()
    assert msg["Message-ID"] == message_id(n, DOMAIN)
    assert len(msg["From"].addresses) == 1


# --- valid events ---------------------------------------------------------------------------

DEPARTMENTS = st.sampled_from(["support", "billing", "Customer Support", "BILLING", "nowhere"])
USERS = st.sampled_from(["alice", "bob", "Carol Weber", "dana@customer.test", "x@y.test", "zed"])
SUPPLIERS = st.sampled_from(["acme", "druckhaus", "ACME Parts", "ops@supplier.test"])
AUTHORS = st.none() | st.sampled_from(["alice", "Bob Lee", "carol@helpdesk.test", "ghost"])


def routed_activities(ticket_id: str | None = None) -> st.SearchStrategy[Any]:
    """Activities whose recipient tokens the example directory (mostly) knows."""
    return activities(
        departments=DEPARTMENTS,
        users=USERS,
        suppliers=SUPPLIERS,
        authors=AUTHORS,
        ticket_id=ticket_id,
    )


@FUZZ
@given(activity_events(routed_activities(), with_ticket=True))
def test_random_valid_events_build_clean_messages(event: ActivityEvent) -> None:
    deliver(event)


@FUZZ
@given(
    st.sampled_from(["1042", "1043", "9999"]).flatmap(
        lambda t: wire_activity_pairs(routed_activities(ticket_id=t))
    ),
    st.sampled_from(["ticketActivity.created", "ticketActivity.updated"]),
    st.booleans(),
)
def test_wire_shape_events_parse_and_build(
    pair: tuple[dict[str, Any], Any], kind: str, with_header: bool
) -> None:
    """Every lenient wire variant parses (tickets from the directory), then builds cleanly."""
    wire, _ = pair
    value = json.dumps(cloudevent_for(wire, type=kind)).encode()  # type: ignore[arg-type]
    event = parse_or_none(value, CONTENT_TYPE if with_header else {})
    assert event is not None, "a valid wire-shape event was refused"
    deliver(event)


# --- hostile fields ------------------------------------------------------------------------


def base_event() -> dict[str, Any]:
    """A valid event reaching every kind: customer content + update, staff, two suppliers."""
    activity = {
        "id": "5001",
        "ticketID": "1042",
        "parentActivity": "5000",
        "ticketActivityType": "E-mail",
        "activityUser": "carol",
        "activityText": "The technician comes on Monday.",
        "sendContentByEmail": "Yes",
        "updateText": "In progress.",
        "sendUpdateByEmail": "Yes",
        "commentText": "VIP customer.",
        "activityDepartments": ["billing"],
        "activityUsers": ["dave@helpdesk.test"],
        "activitySuppliers": ["acme", "parts@supplier.test"],
        "standardTicketAttachments": ["standard/terms.pdf"],
        "thisTicketAttachments": ["tickets/1042/photo.jpg"],
        "invoiceAttachments": ["invoices/INV-1.pdf"],
        "activityDate": "2026-11-27T09:15:00Z",
        "actionRequiredDate": "2026-12-01",
        "actionRequiredTime": "14:30",
        "followupDate": "2026-12-03",
    }
    event = cloudevent_for(activity, event_id="0d9f7c1e-3a2b-4c5d-8e9f-0a1b2c3d4e5f")
    event["data"]["ticket"] = {
        "id": "1042",
        "reference": "T-1042",
        "subject": "Printer on floor 3 jams",
        "customer": {"name": "Dana Smith", "email": "dana@customer.test", "locale": "de"},
    }
    return event


# (path into the event, how the hostile value is placed): "set" replaces the value,
# "list" makes it one more element of a list field.
TARGETS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("data", "ticket", "subject"), "set"),
    (("data", "ticket", "reference"), "set"),
    (("data", "ticket", "customer", "name"), "set"),
    (("data", "ticket", "customer", "locale"), "set"),
    (("data", "activity", "id"), "set"),
    (("data", "activity", "parentActivity"), "set"),
    (("data", "activity", "ticketActivityType"), "set"),
    (("data", "activity", "activityUser"), "set"),
    (("data", "activity", "activityText"), "set"),
    (("data", "activity", "updateText"), "set"),
    (("data", "activity", "commentText"), "set"),
    (("data", "activity", "activityUsers"), "list"),
    (("data", "activity", "activityDepartments"), "list"),
    (("data", "activity", "activitySuppliers"), "list"),
    (("data", "activity", "standardTicketAttachments"), "list"),
    (("data", "activity", "thisTicketAttachments"), "list"),
    (("data", "activity", "invoiceAttachments"), "list"),
    (("data", "activity", "actionRequiredDate"), "set"),
    (("id",), "set"),
    (("source",), "set"),
    (("subject",), "set"),
    (("ticket-id",), "set"),  # activity.ticketID and ticket.id together
)


def apply(event: dict[str, Any], path: tuple[str, ...], how: str, value: str) -> None:
    if path == ("ticket-id",):
        event["data"]["activity"]["ticketID"] = value
        event["data"]["ticket"]["id"] = value
        return
    node = event
    for key in path[:-1]:
        node = node[key]
    if how == "list":
        node[path[-1]] = [*node.get(path[-1], []), value]
    else:
        node[path[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TARGETS), hostile()), min_size=1, max_size=5))
@example([((("data", "ticket", "subject"), "set"), "=?UTF-8?Q?=0A?=Bcc: x@evil.test")])
@example([((("data", "ticket", "customer", "name"), "set"), "Eve\r\nBcc: x@evil.test")])
@example([((("data", "activity", "thisTicketAttachments"), "list"), "a\r\nBcc: x.pdf")])
@example([((("data", "activity", "id"), "set"), "5001\r\nBcc: x@evil.test")])
@example([((("data", "activity", "parentActivity"), "set"), "=?UTF-8?Q?=0A?=Bcc: x")])
@example([((("ticket-id",), "set"), "1042\nBcc: x@evil.test")])
def test_hostile_fields_never_reach_a_header_raw(
    mutations: list[tuple[tuple[tuple[str, ...], str], str]],
) -> None:
    event = base_event()
    for (path, how), value in mutations:
        apply(event, path, how, value)
    pipeline(json.dumps(event).encode(), CONTENT_TYPE)


ADDRESS_TOKENS = st.sampled_from(
    [
        "x@evil.test\r\nBcc: y@evil.test",
        "x@evil.test,y@evil.test",
        "x@evil.test>, <y@evil.test",
        "=?utf-8?q?x?=@evil.test",
        "x@evil.test\x00y@evil.test",
        "x@[127.0.0.1]",
        "x@bücher.test",
        '"quoted"@evil.test',
    ]
)


@FUZZ
@given(st.lists(ADDRESS_TOKENS, min_size=1, max_size=3), st.sampled_from(TARGETS[11:14]))
def test_hostile_address_tokens(tokens: list[str], target: tuple[tuple[str, ...], str]) -> None:
    """Tokens that look a bit like addresses: either refused/unresolved or written safely."""
    event = base_event()
    for token in tokens:
        apply(event, target[0], "list", token)
    pipeline(json.dumps(event).encode(), CONTENT_TYPE)


@pytest.mark.parametrize(
    "token",
    ["ü@staff.test", "a.@staff.test", "a..b@staff.test", "=?utf-8?q?x?=@staff.test", "x@a..test"],
)
def test_recipient_token_accepted_as_address_can_be_written(token: str) -> None:
    """An activityUsers token routing accepts as an address must also be writable to To.

    (Found by this suite: `fields.looks_like_email` once accepted these while
    `mime.addr_spec` refused them, and the AddressError escaped the dispatcher.)
    """
    event = base_event()
    event["data"]["activity"]["activityUsers"] = [token]
    pipeline(json.dumps(event).encode(), CONTENT_TYPE)


ADDRESS_CHARS = st.sampled_from(
    [*"abcXYZ09.-_+=?!#$%&'*/^`{|}~\"(),:;<>[]\\ @", "ü", "ß", "\u2028", "\x85", "\x00", "\r\n"]
)


@FUZZ
@given(
    st.lists(ADDRESS_CHARS, min_size=1, max_size=12).map("".join),
    st.lists(ADDRESS_CHARS, min_size=1, max_size=12).map("".join),
)
def test_every_address_routing_accepts_can_be_written(local: str, domain: str) -> None:
    """The seam between validation and MIME: what passes as an address must fit a To."""
    address = f"{local}@{domain}"
    if looks_like_email(address):
        addr_spec(address)


# --- mutated bytes -------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seed: st.SearchStrategy[bytes]) -> bytes:
    """A valid event's bytes with byte flips, insertions, deletions or a truncation."""
    data = bytearray(draw(seed))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from(b'\x00\r\n"\\{}[],:\xff\xc3\x80 0a-'))
        elif op == "insert":
            chunk = draw(
                st.sampled_from(
                    [b"\r\n", b"\\r\\nBcc: x@evil.test", b"\\u0000", b"\\u2028", b"=?UTF-8?Q?=0A?="]
                )
                | st.binary(max_size=8)
            )
            data[at:at] = chunk
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "splice":
            data[at:at] = data[: draw(st.integers(0, 40))]
    return bytes(data)


BASE_BYTES = st.just(json.dumps(base_event()).encode())


@FUZZ
@given(mutated(BASE_BYTES | wire_events()), st.booleans())
def test_mutated_bytes(value: bytes, with_header: bool) -> None:
    pipeline(value, CONTENT_TYPE if with_header else {})


@FUZZ
@given(
    st.none() | st.binary(max_size=200) | texts().map(str.encode),
    st.dictionaries(
        st.sampled_from(
            ["content-type", "ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "x"]
        ),
        st.binary(max_size=30) | st.sampled_from([b"1.0", b"ticketActivity.created", b"\xff"]),
        max_size=5,
    ),
)
def test_arbitrary_bytes_and_headers(value: bytes | None, headers: dict[str, bytes]) -> None:
    pipeline(value, headers)


BINARY_MODE = {
    "ce_specversion": b"1.0",
    "ce_id": b"42",
    "ce_source": b"/x",
    "ce_type": b"ticketActivity.created",
    "content-type": b"application/json",
}


@FUZZ
@given(mutated(st.just(json.dumps(base_event()["data"]).encode())))
def test_mutated_binary_mode(value: bytes) -> None:
    """Binary CloudEvents mode: attributes in ce_* headers, the (mutated) data as the value."""
    pipeline(value, BINARY_MODE)


# --- message assembly on any notification ----------------------------------------------------


@st.composite
def hostile_notifications(draw: st.DrawFn) -> Notification:
    """Notifications with hostile text in every field a header or file name is made of."""
    kind = draw(st.sampled_from(list(Kind)))
    text = hostile()
    local = draw(
        st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True).filter(
            lambda s: ".." not in s and not s.endswith(".")
        )
    )
    recipient = Contact(draw(text), f"{local}@example.test", draw(st.sampled_from(["en", "de"])))
    refs = tuple(draw(st.lists(text, max_size=3)))
    return Notification(
        kind=kind,
        activity_id=draw(text.filter(bool)),
        ticket_id=draw(text.filter(bool)),
        ticket_reference=draw(text),
        ticket_subject=draw(text),
        customer_name=draw(text),
        parent_activity_id=draw(st.none() | text),
        recipient=recipient,
        activity_type=draw(st.none() | text),
        author=draw(st.none() | text),
        activity_text=draw(text),
        update_text=draw(text),
        comment_text=draw(text) if kind is Kind.STAFF else "",
        attachments=refs if kind is not Kind.STAFF else (),
        listed_attachments=refs if kind is Kind.STAFF else (),
        moment=draw(text) if kind.reminder else "",  # the Message-ID is minted from it
    )


@FUZZ
@given(hostile_notifications(), st.sampled_from([SENDER, "helpdesk@helpdesk.test", "Ä <h@x.test>"]))
def test_build_message_on_hostile_notifications(n: Notification, sender: str) -> None:
    build_and_check(n, sender)


def test_fixture_event_reaches_every_kind() -> None:
    """The hostile-field tests start from an event that produces every kind of mail."""
    event = parse_event(json.dumps(base_event()).encode(), CONTENT_TYPE)
    kinds = {n.kind for n in route(event, DIRECTORY, RoutingPolicy()).notifications}
    assert kinds == {kind for kind in Kind if not kind.reminder}  # reminders are not routed
    assert deliver(copy.deepcopy(event)) == 6
