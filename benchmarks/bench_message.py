"""Micro-benchmark: service.message.build_message against a naive stdlib EmailMessage builder.

Run: .venv/bin/python benchmarks/bench_message.py [--n 2000]
Prints µs per message for both builders (with and without attachments) and the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.policy
import statistics
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.core.directory import Contact
from service.core.message import Attachment, build_message, message_id, thread_ids
from service.core.render import RenderedMail
from service.core.routing import Kind, Notification

DOMAIN = "helpdesk.test"
SENDER = "Helpdesk <notify@helpdesk.test>"
REPLY_TO = "Support <support@helpdesk.test>"
WHEN = dt.datetime(2026, 11, 27, 9, 15, tzinfo=dt.UTC)

NOTIFICATION = Notification(
    kind=Kind.CUSTOMER_CONTENT,
    activity_id="5001",
    ticket_id="1042",
    ticket_reference="T-1042",
    ticket_subject="Drucker im 3. Stock klemmt",
    customer_name="Jürgen Müller",
    parent_activity_id="5000",
    recipient=Contact("Jürgen Müller", "juergen@customer.test", "de"),
    activity_text="Guten Tag, der Techniker kommt am Montag.",
)
TEXT = (
    "Guten Tag Jürgen Müller,\n\nder Techniker kommt am Montag zwischen 9 und 12 Uhr. "
    "Bitte sorgen Sie dafür, dass der Drucker erreichbar ist.\n\n"
    * 6
    + "Mit freundlichen Grüßen\nIhr Helpdesk-Team\n"
)
HTML = (
    '<!DOCTYPE html><html lang="de"><head><meta charset="utf-8"></head><body>'
    + '<div style="margin: 0 0 16px 0;padding: 12px;background-color: #f9fafb;">'
    + TEXT.replace("\n", "<br>\n")
    + "</div></body></html>"
)
MAIL = RenderedMail("[T-1042] Drucker im 3. Stock klemmt – Störung", TEXT, HTML)
ATTACHMENTS = (
    Attachment("Rechnung März.pdf", "application/pdf", bytes(range(256)) * 200),
    Attachment("terms.pdf", "application/pdf", b"%PDF-1.4\n" * 2000),
)


def ours(attachments: tuple[Attachment, ...]) -> bytes:
    return build_message(
        NOTIFICATION,
        MAIL,
        sender=SENDER,
        reply_to=REPLY_TO,
        domain=DOMAIN,
        attachments=attachments,
        date=WHEN,
    )


def naive(attachments: tuple[Attachment, ...]) -> bytes:
    """What one would write first: EmailMessage with policy.default, same headers."""
    n = NOTIFICATION
    thread = thread_ids(n, DOMAIN)
    msg = EmailMessage(policy=email.policy.default)
    msg["Date"] = format_datetime(WHEN)
    msg["From"] = SENDER
    msg["Reply-To"] = REPLY_TO
    msg["To"] = f"{n.recipient.name} <{n.recipient.email}>"
    msg["Subject"] = MAIL.subject
    msg["Message-ID"] = message_id(n, DOMAIN)
    msg["In-Reply-To"] = thread.in_reply_to
    msg["References"] = " ".join(thread.references)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(MAIL.text)
    msg.add_alternative(MAIL.html, subtype="html")
    for item in attachments:
        maintype, _, subtype = item.content_type.partition("/")
        msg.add_attachment(item.data, maintype=maintype, subtype=subtype, filename=item.filename)
    return msg.as_bytes(policy=email.policy.SMTP)


def per_message_us(
    fn: Callable[[tuple[Attachment, ...]], bytes],
    arg: tuple[Attachment, ...],
    n: int,
    repeats: int = 5,
) -> float:
    """Best-of-median: the median of `repeats` runs of `n` calls, in µs per call."""
    fn(arg)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(n):
            fn(arg)
        runs.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="messages per timed run")
    args = parser.parse_args()
    print(f"{'case':<22}{'ours µs/msg':>14}{'EmailMessage µs/msg':>22}{'ratio':>9}")
    for label, attachments in (("text+html", ()), ("text+html+2 files", ATTACHMENTS)):
        count = args.n if not attachments else max(args.n // 4, 50)
        mine = per_message_us(ours, attachments, count)
        theirs = per_message_us(naive, attachments, max(count // 10, 20))
        size = len(ours(attachments))
        print(f"{label:<22}{mine:>14.1f}{theirs:>22.1f}{theirs / mine:>8.1f}x  ({size} bytes)")


if __name__ == "__main__":
    main()
