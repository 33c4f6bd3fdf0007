"""Tests for core.message and core.mime: structure, headers, threading, injection."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import html
import re
from email.message import EmailMessage, MIMEPart

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devkit.events import make_notification
from service.core.directory import Contact
from service.core.message import (
    AddressError,
    Attachment,
    build_message,
    message_id,
    rethreaded,
    thread_ids,
)
from service.core.mime import html_body, media_type, safe_filename, text_body
from service.core.render import RenderedMail
from service.core.routing import Kind
from service.core.text import one_line as clean
from service.delivery.smtp_wire import dot_stuff

DOMAIN = "helpdesk.test"
WHEN = dt.datetime(2026, 11, 27, 9, 15, tzinfo=dt.UTC)
MAIL = RenderedMail(
    subject="[T-1042] Printer on floor 3 jams",
    text="Dear Dana,\n\nthe technician comes on Monday.\n",
    html="<html><body><p>Dear Dana,</p><p>the technician comes on Monday.</p></body></html>",
)
PDF = Attachment("terms.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(range(256)) * 40)
HEADERS = {
    "date",
    "from",
    "reply-to",
    "to",
    "subject",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "auto-submitted",
    "x-auto-response-suppress",
    "content-type",
}
CVE_2024_6923 = "=?UTF-8?Q?=0A?=Bcc: evil@attacker.test"


def build(
    n: object = None,
    mail: RenderedMail = MAIL,
    attachments: tuple[Attachment, ...] = (),
    reply_to: str | None = "Support <support@helpdesk.test>",
    sender: str = "Helpdesk <notify@helpdesk.test>",
) -> bytes:
    return build_message(
        n if n is not None else make_notification(),  # type: ignore[arg-type]
        mail,
        sender=sender,
        reply_to=reply_to,
        domain=DOMAIN,
        attachments=attachments,
        date=WHEN,
    )


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def assert_wire_format(data: bytes) -> None:
    """CRLF only, lines within 998 octets (RFC 5322 §2.1.1), 7-bit clean; encoded lines
    (and headers) within 78, a 7bit HTML part's within 998."""
    assert data.isascii()
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\0" not in data
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    _head, _, body = data.partition(b"\r\n\r\n")
    limit = 78
    for line in body.split(b"\r\n"):
        if line.startswith(b"--=_"):
            limit = 78
        elif line.lower() == b"content-transfer-encoding: 7bit":
            limit = 998
        assert len(line) <= limit


def content(part: MIMEPart) -> str:
    """A text part's decoded content, canonical CRLF turned back into newlines."""
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def header_block(data: bytes) -> list[str]:
    """The raw header fields of the top level, unfolded."""
    head = data.partition(b"\r\n\r\n")[0].decode("ascii")
    return re.split(r"\r\n(?![ \t])", head.replace("\r\n ", " "))


def test_without_attachments_it_is_multipart_alternative_text_then_html() -> None:
    data = build()
    assert_wire_format(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    assert content(parts[0]) == MAIL.text
    assert content(parts[1]) == MAIL.html
    assert not msg.defects
    assert not any(p.defects for p in msg.walk())


def test_with_attachments_it_is_multipart_mixed() -> None:
    png = Attachment("photo.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
    data = build(attachments=(PDF, png))
    assert_wire_format(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed"
    alternative, *files = list(msg.iter_parts())
    assert alternative.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]
    assert [(f.get_filename(), f.get_content_type(), f.get_content()) for f in files] == [
        ("terms.pdf", "application/pdf", PDF.data),
        ("photo.png", "image/png", png.data),
    ]
    assert all(f.get_content_disposition() == "attachment" for f in files)
    assert all(f["content-transfer-encoding"] == "base64" for f in files)


def test_headers() -> None:
    n = make_notification(recipient=Contact("Dana Smith", "dana@customer.test", "de"))
    msg = parse(build(n))
    assert {k.lower() for k in msg} == HEADERS
    assert len(msg.keys()) == len(HEADERS)
    assert msg["From"] == "Helpdesk <notify@helpdesk.test>"
    assert msg["Reply-To"] == "Support <support@helpdesk.test>"
    assert msg["To"] == "Dana Smith <dana@customer.test>"
    assert msg["Subject"] == "[T-1042] Printer on floor 3 jams"
    assert msg["Date"].datetime == WHEN
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == message_id(n, DOMAIN)


def test_reply_to_is_left_out_when_not_set() -> None:
    msg = parse(build(reply_to=None))
    assert "Reply-To" not in msg
    assert {k.lower() for k in msg} == HEADERS - {"reply-to"}


def test_non_ascii_subject_and_names_are_encoded_words() -> None:
    n = make_notification(recipient=Contact("Jürgen Müller", "jm@customer.test", "de"))
    mail = RenderedMail("[T-1042] Drucker im 3. Stock klemmt – Störung", "ä", "<p>ä</p>")
    data = build(n, mail, sender="Hälpdesk <notify@helpdesk.test>")
    assert_wire_format(data)
    assert b"=?utf-8?b?" in data
    msg = parse(data)
    assert msg["Subject"] == mail.subject
    assert msg["To"].addresses[0].display_name == "Jürgen Müller"
    assert msg["From"].addresses[0].display_name == "Hälpdesk"


def test_display_names_with_specials_are_quoted() -> None:
    n = make_notification(recipient=Contact('Smith, Dana "D." <x@y>', "dana@customer.test"))
    msg = parse(build(n))
    (addr,) = msg["To"].addresses
    assert addr.display_name == 'Smith, Dana "D." <x@y>'
    assert addr.addr_spec == "dana@customer.test"


def test_idn_domains_become_a_labels_and_bad_addresses_are_refused() -> None:
    msg = parse(build(make_notification(email="info@bücher.example")))
    assert msg["To"].addresses[0].addr_spec == "info@xn--bcher-kva.example"
    for bad in (
        "a@b.test, c@d.test",
        "a b@c.test",
        "nobody",
        "=?utf-8?q?x?=@d.test",
        "ü@x.test",
        "a@b..test",
        'a"b@c.test',
        "a@=?utf-8?q?x?=",
        "<a@b.test>",
    ):
        with pytest.raises(AddressError) as caught:
            build(make_notification(email=bad))
        assert bad not in str(caught.value)


@pytest.mark.parametrize("local", ["a.", ".", "a..b", ".a"])
def test_local_parts_that_are_not_dot_atoms_travel_quoted(local: str) -> None:
    data = build(make_notification(email=f"{local}@customer.test"))
    assert f'<"{local}"@customer.test>'.encode() in data
    assert parse(data)["To"].addresses[0].addr_spec == f"{local}@customer.test"


def test_message_id_is_fixed_per_activity_kind_and_recipient() -> None:
    a = make_notification(Kind.STAFF)
    same = make_notification(Kind.STAFF, activity_text="edited", email=a.recipient.email.upper())
    assert message_id(a, DOMAIN) == message_id(same, DOMAIN)
    assert re.fullmatch(r"<a\.5001\.staff\.[0-9a-f]{16}@helpdesk\.test>", message_id(a, DOMAIN))
    others = {
        message_id(make_notification(Kind.SUPPLIER, recipient=a.recipient), DOMAIN),
        message_id(make_notification(Kind.STAFF, email="carol@helpdesk.test"), DOMAIN),
        message_id(make_notification(Kind.STAFF, activity_id="5002"), DOMAIN),
    }
    assert message_id(a, DOMAIN) not in others
    assert len(others) == 3
    assert parse(build(a))["Message-ID"] == parse(build(same))["Message-ID"]


@pytest.mark.parametrize(
    "activity_id", ["a b", "x\r\nBcc: y", "..", "a..b", ".a", "ü", "h_1", "x" * 65]
)
def test_unsafe_activity_ids_are_hashed(activity_id: str) -> None:
    mid = message_id(make_notification(activity_id=activity_id), DOMAIN)
    assert re.fullmatch(r"<a\.h_[0-9a-f]{32}\.customer_content\.[0-9a-f]{16}@helpdesk\.test>", mid)


def test_the_configured_domain_cannot_break_the_header() -> None:
    mid = message_id(make_notification(), "bad domain\r\n>")
    assert mid.endswith("@localhost>")
    assert message_id(make_notification(), "bücher.example").endswith("@xn--bcher-kva.example>")


def test_every_mail_of_a_ticket_refers_to_the_thread_root() -> None:
    first = make_notification()
    parent_mail = message_id(first, DOMAIN)
    answer = make_notification(
        activity_id="5002", parent_activity_id="5001", in_reply_to=parent_mail
    )
    assert thread_ids(first, DOMAIN) == ("<t.1042@helpdesk.test>", ("<t.1042@helpdesk.test>",))
    assert thread_ids(answer, DOMAIN) == (parent_mail, ("<t.1042@helpdesk.test>", parent_mail))
    msg = parse(build(answer))
    assert msg["In-Reply-To"] == parent_mail
    assert msg["References"].split() == ["<t.1042@helpdesk.test>", parent_mail]
    plain = parse(build(first))
    assert plain["In-Reply-To"] == plain["References"] == "<t.1042@helpdesk.test>"


def test_a_follow_up_without_a_parent_mail_falls_back_to_the_ticket_root() -> None:
    orphan = make_notification(activity_id="5002", parent_activity_id="5001")
    assert thread_ids(orphan, DOMAIN) == ("<t.1042@helpdesk.test>", ("<t.1042@helpdesk.test>",))
    # Whatever the ledger held, only a plain msg-id reaches a header.
    forged = make_notification(parent_activity_id="5001", in_reply_to="<x@y>\r\nBcc: e@v.test")
    assert thread_ids(forged, DOMAIN)[0] == "<t.1042@helpdesk.test>"


PARENTS = st.one_of(
    st.none(),
    st.sampled_from(["<a.5001.customer_content.0123456789abcdef@helpdesk.test>", "<x@y>"]),
    st.text(max_size=30),  # whatever the ledger held: only a plain msg-id is used
)


@settings(max_examples=60, deadline=None)
@given(
    before=PARENTS,
    after=PARENTS,
    subject=st.text(max_size=200),
    with_pdf=st.booleans(),
)
def test_a_mail_rethreaded_is_the_mail_built_for_its_new_parent(
    before: str | None, after: str | None, subject: str, with_pdf: bool
) -> None:
    # A subject is folded over several lines; one that quotes the threading headers
    # cannot be taken for them.
    mail = RenderedMail(f"In-Reply-To: {subject}\r\nReferences: <z@z>", MAIL.text, MAIL.html)
    attachments = (PDF,) if with_pdf else ()
    first = make_notification(activity_id="5002", parent_activity_id="5001", in_reply_to=before)
    second = first.evolve(in_reply_to=after)
    built = build(first, mail, attachments)
    assert rethreaded(built, second, DOMAIN) == build(second, mail, attachments)


def test_a_message_not_written_by_build_message_is_not_rethreaded() -> None:
    n = make_notification()
    assert rethreaded(b"Subject: x\r\n\r\nIn-Reply-To: <a@b>\r\n", n, DOMAIN) is None
    assert rethreaded(b"", n, DOMAIN) is None


def test_output_is_deterministic() -> None:
    assert build(attachments=(PDF,)) == build(attachments=(PDF,))


@pytest.mark.parametrize(
    "payload",
    [
        "x\r\nBcc: evil@attacker.test",
        "x\nBcc: evil@attacker.test",
        "x\rBcc: evil@attacker.test",
        "x\0Bcc: evil@attacker.test",
        CVE_2024_6923,
        "x\u2028Bcc: evil@attacker.test",
    ],
)
def test_no_header_injection_through_subject_names_or_filenames(payload: str) -> None:
    n = make_notification(
        recipient=Contact(payload, "dana@customer.test"),
        ticket_id=payload,
        parent_activity_id=payload,
    )
    mail = RenderedMail(payload, payload, payload)
    data = build(
        n,
        mail,
        attachments=(Attachment(payload, payload, b"x"),),
        sender=f"{payload} <notify@helpdesk.test>",
    )
    assert_wire_format(data)
    assert b"\r\nBcc" not in data.partition(b"\r\n\r\n")[0]
    msg = parse(data)
    assert all("Bcc" not in part for part in msg.walk())
    assert {k.lower() for k in msg} == HEADERS
    for value in msg.values():
        assert not set(str(value)) & {"\r", "\n", "\0"}
    assert msg["Subject"] == clean(payload)
    assert msg["To"].addresses[0].display_name == clean(payload)
    (attachment,) = [p for p in msg.walk() if p.get_content_disposition() == "attachment"]
    assert attachment.get_filename() == safe_filename(payload)
    assert "=?" not in safe_filename(payload)
    assert attachment.get_content_type() == "application/octet-stream"


def test_the_cve_2024_6923_vector_arrives_as_literal_text() -> None:
    data = build(mail=RenderedMail(CVE_2024_6923, "t", "h"))
    assert b"=?UTF-8?Q?=0A?=" not in data
    assert parse(data)["Subject"] == CVE_2024_6923


def test_non_ascii_filenames_carry_rfc2047_and_rfc2231_forms() -> None:
    name = "März – Übersicht.pdf"
    data = build(attachments=(Attachment(name, "application/pdf", b"%PDF"),))
    assert_wire_format(data)
    head = data.split(b"--=_m.")[2].partition(b"\r\n\r\n")[0].decode("ascii").replace("\r\n ", " ")
    assert re.search(r'Content-Type: application/pdf; name="=\?utf-8\?b\?[^"]+\?="', head)
    assert re.search(r'Content-Disposition: attachment; filename="=\?utf-8\?b\?[^"]+\?="', head)
    assert "filename*=utf-8''M%C3%A4rz%20%E2%80%93%20%C3%9Cbersicht.pdf" in head
    (part,) = [p for p in parse(data).walk() if p.get_content_disposition() == "attachment"]
    assert part.get_filename() == name
    assert part["Content-Type"].params["name"] == name


def test_long_filenames_use_rfc2231_continuations() -> None:
    name = "Ü" * 120 + ".pdf"
    data = build(attachments=(Attachment(name, "application/pdf", b"%PDF"),))
    assert_wire_format(data)
    assert b"filename*0*=utf-8''" in data
    assert b"filename*1*=" in data
    (part,) = [p for p in parse(data).walk() if p.get_content_disposition() == "attachment"]
    assert part.get_filename() == name


def test_text_bodies_use_quoted_printable_or_base64_as_fits() -> None:
    assert text_body("Guten Tag, der Techniker kommt am Montag – wir bitten um Geduld.\n")[0] == (
        "quoted-printable"
    )
    assert text_body("東京の天気は晴れです")[0] == "base64"
    cte, body = text_body("x" * 300 + "\n.\nend \n")
    assert cte == "quoted-printable"
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))


PAGE = "<html><head><style>p { color: #333; }</style></head><body>\n<p>BODY</p>\n</body></html>"


def page_of(body: str) -> str:
    return PAGE.replace("BODY", body)


def html_part(data: bytes) -> tuple[str, str]:
    """(Content-Transfer-Encoding, decoded content) of the message's HTML part."""
    (part,) = [p for p in parse(data).walk() if p.get_content_type() == "text/html"]
    return str(part["Content-Transfer-Encoding"]), content(part)


@pytest.mark.parametrize(
    "text",
    [
        "Grüße aus Köln – bis Montag",
        "plain ASCII & <escaped>",
        "Mit Grüßen, Ωμέγα 😀, from the helpdesk team of the company\nend",
        "x" * 990,
    ],
)
def test_html_in_a_latin_script_travels_7bit_with_character_references(text: str) -> None:
    page = page_of(html.escape(text).replace("\n", "<br>\n"))
    data = build(mail=RenderedMail("s", "t", page))
    assert_wire_format(data)
    encoding, received = html_part(data)
    assert encoding == "7bit"
    # The reader sees the same characters: references stand for them.
    assert html.unescape(received) == html.unescape(page.replace("\r\n", "\n"))


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (page_of("x" * 1200), "quoted-printable"),  # a line over 998 octets
        (page_of("a\0b"), "quoted-printable"),  # NUL may not travel 7bit
        (page_of("a\x1bb"), "quoted-printable"),
        (page_of("x<br>\n--=_a.0123"), "quoted-printable"),  # reads like a boundary
        ("--=_a.0123\n<p>x</p>", "quoted-printable"),
        (page_of("x").replace("#333;", "#333; content: 'ä';"), "quoted-printable"),
        ("<script>var s = 'ä';</script><p>ä</p>", "quoted-printable"),
        (page_of("東京の天気は晴れです" * 20), "base64"),  # references: larger than base64
        (page_of("ü" * 400), "base64"),
    ],
)
def test_html_that_cannot_travel_as_is_is_encoded(page: str, expected: str) -> None:
    assert html_body(page)[0] == expected
    data = build(mail=RenderedMail("s", "t", page))
    assert_wire_format(data)
    encoding, received = html_part(data)
    assert encoding == expected
    assert received == page.replace("\r\n", "\n")


def test_a_boundary_in_the_activity_text_makes_no_part() -> None:
    token = re.search(rb'boundary="(=_a\.[0-9a-f]+)"', build()).group(1).decode()
    forged = f"x\n--{token}\nContent-Type: text/html\n\n<p>forged</p>\n--{token}--"
    page = page_of(html.escape(forged).replace("\n", "<br>\n"))
    data = build(mail=RenderedMail("s", "t", page))
    assert [p.get_content_type() for p in parse(data).walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]
    assert html_part(data)[1] == page


def test_cjk_text_parses_back() -> None:
    mail = RenderedMail("[T-1] 東京", "東京の天気は晴れです\n" * 30, "<p>東京</p>")
    msg = parse(build(mail=mail))
    text, _html = list(msg.iter_parts())
    assert text["content-transfer-encoding"] == "base64"
    assert content(text) == mail.text
    assert msg["Subject"] == mail.subject


def test_bare_cr_and_lf_in_bodies_become_crlf() -> None:
    mail = RenderedMail("s", "a\rb\nc\r\nd", "<p>a\rb</p>")
    data = build(mail=mail)
    assert_wire_format(data)
    text, _ = list(parse(data).iter_parts())
    assert content(text) == "a\nb\nc\nd"


def test_dot_stuffed_doubles_the_dots_that_start_a_body_s_lines_and_nothing_else() -> None:
    # The 7bit HTML body starts with a dot; the text body has dotted lines inside.
    mail = RenderedMail(".subject", ".first\n..second\nthird .\n.", ".<p>x</p>\n.<b>y</b>")
    files = [Attachment("a.txt", "text/plain", b".dot\n" * 40)]
    plain = build_message(
        make_notification(),
        mail,
        sender="Helpdesk <notify@helpdesk.test>",
        reply_to=None,
        domain=DOMAIN,
        attachments=files,
        date=WHEN,
    )
    stuffed = build_message(
        make_notification(),
        mail,
        sender="Helpdesk <notify@helpdesk.test>",
        reply_to=None,
        domain=DOMAIN,
        attachments=files,
        date=WHEN,
        dot_stuffed=True,
    )
    assert stuffed == dot_stuff(plain)
    assert stuffed != plain  # there was something to stuff
    # What a server makes of it (RFC 5321 §4.5.2: one leading dot dropped per line).
    lines = stuffed.split(b"\r\n")
    assert b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines) == plain


def test_naive_dates_are_taken_as_utc() -> None:
    data = build_message(
        make_notification(),
        MAIL,
        sender="n@helpdesk.test",
        reply_to=None,
        domain=DOMAIN,
        attachments=(),
        date=dt.datetime(2026, 1, 2, 3, 4, 5),
    )
    assert parse(data)["Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"


def assert_display_name(data: bytes, parsed: str, name: str) -> None:
    """The stdlib keeps the space between adjacent encoded words in a display name, which
    RFC 2047 §6.2 says to drop; where the header has such a pair, compare without spaces."""
    (to,) = [h for h in header_block(data) if h.startswith("To: ")]
    if re.search(r"\?= =\?", to):
        assert "".join(parsed.split()) == "".join(clean(name).split())
    else:
        assert parsed == clean(name)


header_text = st.text(max_size=300)
file_names = st.text(min_size=0, max_size=200)


@settings(database=None)
@given(
    name=header_text,
    subject=header_text,
    filename=file_names,
    sender_name=header_text,
    body=st.text(max_size=500),
)
def test_arbitrary_names_subjects_and_filenames_stay_in_their_headers(
    name: str, subject: str, filename: str, sender_name: str, body: str
) -> None:
    n = make_notification(recipient=Contact(name, "dana@customer.test"))
    sender = f"{sender_name.replace('<', '').replace('>', '')} <notify@helpdesk.test>"
    mail = RenderedMail(subject, body, body)
    data = build(n, mail, attachments=(Attachment(filename, "text/plain", b"data"),), sender=sender)
    assert_wire_format(data)
    assert all(len(line) <= 78 for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"))
    msg = parse(data)
    assert sorted(k.lower() for k in msg) == sorted(HEADERS)
    assert "Bcc" not in msg
    assert len(msg.get_all("To") or []) == 1
    (to,) = msg["To"].addresses
    assert to.addr_spec == "dana@customer.test"
    assert_display_name(data, to.display_name, name)
    assert msg["Subject"] == clean(subject)
    for value in msg.values():
        assert not set(str(value)) & {"\r", "\n", "\0"}
    text, attachment = [p for p in msg.walk() if not p.is_multipart()][0::2]
    expected_body = body.replace("\r\n", "\n").replace("\r", "\n")
    assert content(text) == expected_body
    assert attachment.get_filename() == safe_filename(filename)
    assert attachment.get_content() == "data"


@pytest.mark.parametrize(
    ("given", "written"),
    [
        ("application/PDF", "application/pdf"),
        (
            "text/calendar; charset=utf-8; method=PUBLISH",
            "text/calendar; charset=utf-8; method=PUBLISH",
        ),
        ("Text/Calendar;Charset=UTF-8", "text/calendar; charset=UTF-8"),
        ("text/calendar;", "application/octet-stream"),
        ('text/plain; name="a b"', "application/octet-stream"),
        ("text/plain; x=y\r\nBcc: evil@attacker.test", "application/octet-stream"),
        ("text/plain\r\n; x=y", "application/octet-stream"),
        ("text/plain; x=" + "y" * 200, "application/octet-stream"),
    ],
)
def test_media_types_keep_token_parameters_and_nothing_else(given: str, written: str) -> None:
    assert media_type(given) == written
