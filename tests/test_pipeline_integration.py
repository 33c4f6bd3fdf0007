"""End to end on the real broker and a real SMTP server: the example events become mail."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from devkit.config import service_settings
from devkit.events import example_events, publish
from devkit.inprocess import running_service
from devkit.smtp import SmtpRecorder

pytestmark = pytest.mark.integration

# (recipient, kind) for every mail the seven examples must produce, worked out by hand
# from examples/directory.yaml and the routing policy of the contract.
EXPECTED = {
    # 01: customer content with three attachments; author alice not notified.
    ("dana@customer.test", "5001", "customer_content"),
    ("bob@helpdesk.test", "5001", "staff"),
    ("carol@helpdesk.test", "5001", "staff"),
    # 02: ticket and customer from the directory; update only.
    ("erik.novak@customer.test", "5002", "customer_update"),
    ("alice@helpdesk.test", "5002", "staff"),
    # 03: internal note; alice reached three ways gets one mail; author carol skipped.
    ("alice@helpdesk.test", "5003", "staff"),
    ("bob@helpdesk.test", "5003", "staff"),
    ("billing@helpdesk.test", "5003", "staff"),
    # 04: two suppliers, no invoices.
    ("orders@acme.test", "5004", "supplier"),
    ("service@druckhaus.test", "5004", "supplier"),
    # 05: follow-up of 5001, both customer kinds; author bob skipped.
    ("dana@customer.test", "5005", "customer_content"),
    ("dana@customer.test", "5005", "customer_update"),
    ("alice@helpdesk.test", "5005", "staff"),
    # 06: update of 5002 whose content flag flipped to yes: only the new mail.
    ("erik.novak@customer.test", "5002", "customer_content"),
    # 07: personal data: supplier withheld, the billing mailbox notified.
    ("billing@helpdesk.test", "5006", "staff"),
}


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def identify(message: EmailMessage) -> tuple[str, str, str]:
    # Message-ID is <a.{activity}.{kind}.{hash}@domain>
    _, activity, kind, _ = str(message["Message-ID"]).strip("<>").split("@")[0].split(".")
    return str(message["To"].addresses[0].addr_spec), activity, kind


def body(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


async def test_example_events_become_the_expected_mails(
    tmp_path: Path, kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder
) -> None:
    settings = service_settings(
        tmp_path, bootstrap=kafka_bootstrap, topic=topic, smtp_port=smtp_server.port
    )
    events = example_events()
    async with running_service(settings) as base:
        await publish(kafka_bootstrap, topic, events)
        await smtp_server.wait_for(len(EXPECTED), timeout=60)
        await asyncio.sleep(1.0)  # anything extra would arrive now
        mails = {identify(parse(m.data)): m for m in smtp_server.messages}
        assert len(smtp_server.messages) == len(EXPECTED)
        assert set(mails) == EXPECTED
        for (rcpt, _, _), received in mails.items():
            assert received.rcpt_tos == (rcpt,)
            assert received.mail_from == "helpdesk@helpdesk.test"

        # Redelivering every example sends nothing new.
        await publish(kafka_bootstrap, topic, events)
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                metrics = (await client.get(f"{base}/metrics")).text
                # Example 06 already skipped two of 02's mails on the first pass, so the
                # skip count alone can be reached before example 07 comes round again.
                if _sample(metrics, 'outcome="skipped_duplicate"') >= len(EXPECTED) + 2 and (
                    _sample(metrics, 'kind="supplier",outcome="withheld"') >= 2
                ):
                    break
                await asyncio.sleep(0.2)
        assert len(smtp_server.messages) == len(EXPECTED)
        # Withheld once per delivery of example 07: it was published twice.
        assert _sample(metrics, 'kind="supplier",outcome="withheld"') == 2

    parsed = {key: parse(m.data) for key, m in mails.items()}
    customer = parsed[("dana@customer.test", "5001", "customer_content")]
    source = events[0]["data"]["activity"]
    assert customer["Subject"] == "[T-1042] Printer on floor 3 jams"
    assert customer["Auto-Submitted"] == "auto-generated"
    assert customer["X-Auto-Response-Suppress"] == "All"
    assert customer["Reply-To"] == "support@helpdesk.test"
    assert customer.get_content_type() == "multipart/mixed"
    assert sorted(a.get_filename() for a in customer.iter_attachments()) == [
        "INV-2026-001.pdf",
        "quote.pdf",
        "terms.pdf",
    ]
    first_line = source["activityText"].splitlines()[0]
    assert first_line in body(customer, "plain")
    assert source["commentText"] not in customer.as_string()
    assert "<t.1042@helpdesk.test>" in customer["References"]

    staff = parsed[("bob@helpdesk.test", "5003", "staff")]
    note = events[2]["data"]["activity"]
    assert note["commentText"].splitlines()[0] in body(staff, "plain")
    # Attachments are listed by name, never attached; the only file is the follow-up's .ics.
    assert [a.get_content_type() for a in staff.iter_attachments()] == ["text/calendar"]

    supplier = parsed[("orders@acme.test", "5004", "supplier")]
    names = sorted(a.get_filename() for a in supplier.iter_attachments())
    assert names == ["quote.pdf", "terms.pdf"]

    # The follow-up answers the very mail its parent sent the same recipient.
    follow_up = parsed[("dana@customer.test", "5005", "customer_content")]
    assert follow_up["In-Reply-To"] == customer["Message-ID"]
    assert follow_up["References"].split() == ["<t.1042@helpdesk.test>", customer["Message-ID"]]

    update = parsed[("erik.novak@customer.test", "5002", "customer_update")]
    assert update["Subject"] == "[T-1043] VPN access for new starter"
    assert body(update, "html").lstrip().lower().startswith(("<!doctype", "<html"))


async def test_first_slice_one_event_one_mail(
    tmp_path: Path, kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder
) -> None:
    """The contract's example event, exactly as printed there, reaches the customer."""
    event = {
        "specversion": "1.0",
        "id": "9b2f0c8e-6d0a-4c38-9a61-1f2f6f0e7a10",
        "source": "/backend/api/v1/ticketActivities",
        "type": "ticketActivity.created",
        "subject": "1042",
        "time": "2026-11-27T09:15:00Z",
        "datacontenttype": "application/json",
        "data": {
            "activity": {
                "id": "5001",
                "ticketID": "1042",
                "sendContentByEmail": "Yes",
                "activityText": "Hello {{ 7*7 }} <b>Dana</b>",
            },
            "ticket": {
                "id": "1042",
                "reference": "T-1042",
                "subject": "Printer on floor 3 jams",
                "customer": {"name": "Dana Smith", "email": "dana@customer.test", "locale": "de"},
            },
        },
    }
    settings = service_settings(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        directory_file=None,
    )
    async with running_service(settings):
        await publish(kafka_bootstrap, topic, [event])
        await smtp_server.wait_for(1, timeout=30)
    [received] = smtp_server.messages
    message = parse(received.data)
    assert received.rcpt_tos == ("dana@customer.test",)
    assert message["Subject"] == "[T-1042] Printer on floor 3 jams"
    assert "Hello {{ 7*7 }} <b>Dana</b>" in body(message, "plain")
    assert "Hello {{ 7*7 }} &lt;b&gt;Dana&lt;/b&gt;" in body(message, "html")


async def test_binary_mode_event_is_accepted(
    tmp_path: Path, kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder
) -> None:
    from aiokafka import AIOKafkaProducer

    data = {
        "activity": {
            "id": "77",
            "ticketID": "1042",
            "sendUpdateByEmail": True,
            "updateText": "Parts ordered.",
        },
    }
    settings = service_settings(
        tmp_path, bootstrap=kafka_bootstrap, topic=topic, smtp_port=smtp_server.port
    )
    async with running_service(settings):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        await producer.send_and_wait(
            topic,
            key=b"1042",
            value=json.dumps(data).encode(),
            headers=[
                ("ce_specversion", b"1.0"),
                ("ce_id", b"bin-1"),
                ("ce_type", b"ticketActivity.created"),
                ("ce_source", b"/backend"),
                ("ce_time", b"2026-11-27T09:15:00Z"),
                ("content-type", b"application/json"),
            ],
        )
        await producer.stop()
        await smtp_server.wait_for(1, timeout=30)
    [received] = smtp_server.messages
    assert received.rcpt_tos == ("dana@customer.test",)
    assert "Parts ordered." in body(parse(received.data), "plain")


def _sample(metrics: str, labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("notifier_notifications_total{") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
