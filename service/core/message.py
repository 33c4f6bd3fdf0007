"""Pure MIME assembly: one rendered notification (plus attachments) becomes message bytes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from service.core.mime import (
    CRLF,
    AddressError,
    address,
    base64_body,
    filename_params,
    html_body,
    media_type,
    split_mailbox,
    text_body,
    unstructured,
)

if TYPE_CHECKING:
    from service.core.render import RenderedMail
    from service.core.routing import Notification

__all__ = [
    "AddressError",
    "Attachment",
    "ThreadIds",
    "build_message",
    "message_id",
    "rethreaded",
    "thread_ids",
]

# An id is used verbatim only when it is a short dot-atom (RFC 5322 §3.6.4 id-left); the
# "h_" prefix is reserved for hashed ids so that no verbatim id can equal a hashed one.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_SAFE_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
# What message_id() produces: <dot-atom of [A-Za-z0-9_-]@domain>, nothing a header could trip on.
_MSG_ID = re.compile(r"<[A-Za-z0-9_.-]{1,200}@[A-Za-z0-9.-]{1,253}>")


@dataclass(frozen=True, slots=True)
class Attachment:
    """One file to attach: its display name, media type and content.

    `encoded` may carry the content's base64 body already (a store that caches files
    encodes each once); empty means "encode `data` here".
    """

    filename: str
    content_type: str
    data: bytes
    encoded: bytes = field(default=b"", compare=False, repr=False)


class ThreadIds(NamedTuple):
    """The In-Reply-To id and the References ids (oldest first) of one mail."""

    in_reply_to: str
    references: tuple[str, ...]


def _safe_id(value: str) -> str:
    if len(value) <= 64 and _SAFE_ID.fullmatch(value) and not value.startswith("h_"):
        return value
    return "h_" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@lru_cache(maxsize=64)
def _safe_domain(domain: str) -> str:
    # The domain is configuration, not input, but a bad one must not break every message.
    try:
        ascii_domain = domain.strip().strip(".").encode("idna").decode("ascii")
    except UnicodeError:
        ascii_domain = ""
    return ascii_domain if _SAFE_DOMAIN.fullmatch(ascii_domain) else "localhost"


def message_id(n: Notification, domain: str) -> str:
    """`<a.{activity}.{kind}.{hash(recipient)}@domain>`: a re-send carries the same id.

    A reminder's id also names its moment (`...{kind}.{20261202T080000Z}.{hash}@...`), so a
    moved reminder is a new mail.
    """
    activity_id, kind, recipient, moment = n.key
    digest = hashlib.sha256(recipient.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    at = f".{_safe_id(moment.replace('-', '').replace(':', ''))}" if moment else ""
    return f"<a.{_safe_id(activity_id)}.{kind}{at}.{digest}@{_safe_domain(domain)}>"


def thread_ids(n: Notification, domain: str) -> ThreadIds:
    """Every mail of a ticket refers to a per-ticket root; a follow-up answers its parent.

    The root id is synthetic (no mail carries it), which is enough: clients thread on
    References (RFC 5322 §3.6.4, JWZ threading) and keep a placeholder for the root. A
    follow-up to a recipient who got a mail of the parent activity names that mail, so it
    nests under it; one who got none falls back to the root.
    """
    root = f"<t.{_safe_id(n.ticket_id)}@{_safe_domain(domain)}>"
    # The parent's id comes from our own ledger; still, only a plain msg-id reaches a header.
    if n.in_reply_to and _MSG_ID.fullmatch(n.in_reply_to):
        return ThreadIds(n.in_reply_to, (root, n.in_reply_to))
    return ThreadIds(root, (root,))


def _thread_lines(thread: ThreadIds) -> str:
    references = f"{CRLF} ".join(thread.references)
    return f"In-Reply-To: {thread.in_reply_to}{CRLF}References: {references}{CRLF}"


# The threading headers as build_message writes them, between Message-ID and MIME-Version.
# A folded Subject's lines start with a blank, so no header before them can look like them.
_THREAD_LINES = re.compile(
    rb"\r\nIn-Reply-To: [^\r\n]*\r\nReferences: [^\r\n]*(?:\r\n [^\r\n]*)*\r\n(?=MIME-Version: )"
)


def rethreaded(message: bytes, n: Notification, domain: str) -> bytes | None:
    """`message`, built by build_message for `n` answering another parent (or none), with
    the In-Reply-To and References of `n`: nothing else in a message depends on them.
    None when `message` does not hold them as build_message writes them."""
    head_end = message.find(b"\r\n\r\n")
    found = _THREAD_LINES.search(message, 0, head_end + 2) if head_end >= 0 else None
    if found is None:
        return None
    lines = _thread_lines(thread_ids(n, domain)).encode("ascii")
    return b"".join((message[: found.start()], b"\r\n", lines, message[found.end() :]))


def build_message(
    n: Notification,
    mail: RenderedMail,
    *,
    sender: str,
    reply_to: str | None,
    domain: str,
    attachments: Sequence[Attachment],
    date: datetime,
    dot_stuffed: bool = False,
) -> bytes:
    """RFC 5322/2045 message bytes with CRLF line ends; raises AddressError for a bad address.

    multipart/alternative (text first, HTML last: RFC 2046 §5.1.4 puts the preferred
    version last), wrapped in multipart/mixed when there are attachments.

    `dot_stuffed`: as SMTP's DATA carries it (RFC 5321 §4.5.2), every line that starts
    with a dot given a second one. Only the text and HTML bodies can have such a line: a
    header line starts with its name or, folded, with a space, a boundary line with "--",
    and base64 has no dot. So only they are stuffed, instead of the whole message being
    searched again (attachments are most of its bytes).
    """
    msg_id = message_id(n, domain)
    thread = thread_ids(n, domain)
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    sender_name, sender_addr = split_mailbox(sender)
    # The boundary starts with "=_", which quoted-printable and base64 can never produce
    # and a 7bit HTML part never has at a line's start, so it cannot occur inside any part
    # (RFC 2045 §6.7, RFC 2046 §5.1.1).
    token = hashlib.sha256(msg_id.encode("ascii")).hexdigest()[:32]
    alt_boundary = f"=_a.{token}"
    top_type = f'multipart/alternative;{CRLF} boundary="{alt_boundary}"'
    if attachments:
        mixed_boundary = f"=_m.{token}"
        top_type = f'multipart/mixed;{CRLF} boundary="{mixed_boundary}"'

    head = [
        f"Date: {format_datetime(date)}{CRLF}",
        address("From", sender_name, sender_addr),
    ]
    if reply_to:
        head.append(address("Reply-To", *split_mailbox(reply_to)))
    head += [
        address("To", n.recipient.name, n.recipient.email),
        unstructured("Subject", mail.subject),
        f"Message-ID: {msg_id}{CRLF}",
        _thread_lines(thread),
        f"MIME-Version: 1.0{CRLF}",
        # RFC 3834 §5: automatic responders must not answer auto-generated mail;
        # X-Auto-Response-Suppress is Exchange's equivalent ([MS-OXCMAIL] 2.2.3.2.20).
        f"Auto-Submitted: auto-generated{CRLF}",
        f"X-Auto-Response-Suppress: All{CRLF}",
        f"Content-Type: {top_type}{CRLF}",
        CRLF,
    ]
    out = bytearray("".join(head).encode("ascii"))
    if attachments:
        out += f"--{mixed_boundary}{CRLF}Content-Type: multipart/alternative;{CRLF}".encode("ascii")
        out += f' boundary="{alt_boundary}"{CRLF}{CRLF}'.encode("ascii")
    for subtype, (encoding, body) in (
        ("plain", text_body(mail.text)),
        ("html", html_body(mail.html)),
    ):
        out += (
            f"--{alt_boundary}{CRLF}Content-Type: text/{subtype}; charset=utf-8{CRLF}"
            f"Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}"
        ).encode("ascii")
        out += _stuffed(body) if dot_stuffed else body
        out += b"\r\n"
    out += f"--{alt_boundary}--{CRLF}".encode("ascii")
    if attachments:
        for item in attachments:
            out += _attachment_head(mixed_boundary, item)
            out += item.encoded or base64_body(item.data)
            out += b"\r\n"
        out += f"--{mixed_boundary}--{CRLF}".encode("ascii")
    return bytes(out)


def _stuffed(body: bytes) -> bytes:
    """A body that follows a blank line: its lines that start with a dot get another."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def _attachment_head(boundary: str, item: Attachment) -> bytes:
    ctype = media_type(item.content_type)
    name = filename_params("name", item.filename, extended=False)
    filename = filename_params("filename", item.filename, extended=True)
    return (
        f"--{boundary}{CRLF}"
        f"Content-Type: {ctype}{name}{CRLF}"
        f"Content-Disposition: attachment{filename}{CRLF}"
        f"Content-Transfer-Encoding: base64{CRLF}{CRLF}"
    ).encode("ascii")
