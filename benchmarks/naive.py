"""(b) The naive baseline: aiokafka consumer + stdlib EmailMessage + one aiosmtplib send at a time.

It routes with the service's own pure `route()` so that it sends exactly the mails the
service sends for the same events, but renders with plain f-strings (no Jinja, no CSS
inlining), builds each mail with `email.message.EmailMessage` (policy.default), reads
attachments from disk, sends over one connection one mail at a time, keeps no ledger
and commits once per fetched batch. It does *less* work per mail than the service, so
c/b is, if anything, understated.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import aiosmtplib
from aiokafka import AIOKafkaConsumer

from service.core.directory import load_directory
from service.core.events import parse_event
from service.core.routing import Notification, RoutingPolicy, route

_TYPES = {"pdf": ("application", "pdf"), "jpg": ("image", "jpeg"), "txt": ("text", "plain")}


@dataclass(frozen=True, slots=True)
class NaiveResult:
    events: int
    messages: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def naive_message(n: Notification, store: Path) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = Address("Helpdesk", addr_spec="helpdesk@helpdesk.test")
    msg["To"] = Address(n.recipient.name, addr_spec=n.recipient.email)
    msg["Reply-To"] = "support@helpdesk.test"
    msg["Subject"] = f"[{n.ticket_reference}] {n.ticket_subject}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<a.{n.activity_id}.{n.kind.value}@helpdesk.test>"
    msg["References"] = f"<t.{n.ticket_id}@helpdesk.test>"
    body = "\n\n".join(t for t in (n.activity_text, n.update_text, n.comment_text) if t)
    text = f"Hello {n.recipient.name},\n\n{body}\n\n-- \nYour helpdesk team\n"
    msg.set_content(text)
    markup = html.escape(body).replace("\n", "<br>\n")
    msg.add_alternative(
        f"<html><body><p>Hello {html.escape(n.recipient.name)},</p><div>{markup}</div>"
        "<p>Your helpdesk team</p></body></html>",
        subtype="html",
    )
    for ref in n.attachments:
        name = ref.rpartition("/")[2]
        maintype, subtype = _TYPES.get(name.rpartition(".")[2], ("application", "octet-stream"))
        msg.add_attachment(
            (store / ref).read_bytes(), maintype=maintype, subtype=subtype, filename=name
        )
    return msg


async def run_naive(
    *,
    bootstrap: str,
    topic: str,
    group: str,
    smtp_port: int,
    directory_file: Path,
    attachments_dir: Path,
    max_events: int,
    limit_seconds: float,
) -> NaiveResult:
    """Consume up to `max_events` from the start of `topic`; time from first record to last mail."""
    directory = load_directory(directory_file)
    policy = RoutingPolicy()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=500,
    )
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port)
    await consumer.start()
    await smtp.connect()
    events = messages = 0
    started = cpu = 0.0
    deadline = time.monotonic() + limit_seconds
    try:
        while events < max_events and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            if not batches:
                continue
            if not started:
                started, cpu = time.perf_counter(), time.process_time()
            for records in batches.values():
                for record in records:
                    if events >= max_events:
                        break
                    event = parse_event(record.value, dict(record.headers))
                    for n in route(event, directory, policy).notifications:
                        await smtp.send_message(naive_message(n, attachments_dir))
                        messages += 1
                    events += 1
            await consumer.commit()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await consumer.stop()
        await smtp.quit()
    return NaiveResult(events, messages, seconds, cpu)
