"""On the real broker: events made by the official CloudEvents SDK, in every mode, are mailed.

Each mode of both SDK Kafka bindings (see tests/test_events_sdk.py) publishes one event with
aiokafka, exactly the key, headers and value the SDK made; the running service must mail
every one of them. A plain-text event made the same way must reach the dead-letter topic at
stage `cloudevent`, and nothing else may be mailed.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path

import pytest

from devkit.config import service_settings
from devkit.inprocess import running_service
from devkit.smtp import SmtpRecorder
from devkit.topics import Record, produce, read_topic
from tests.test_events_sdk import MODES, Message, attributes

pytestmark = pytest.mark.integration


def sdk_messages() -> dict[str, Message]:
    """One customer_update per mode, each for its own activity (7001, 7002, ...)."""
    made = {}
    for number, mode in enumerate(MODES, start=7001):
        data = {
            "activity": {
                "id": str(number),
                "ticketID": "1042",
                "sendUpdateByEmail": "Yes",
                "updateText": f"Status from the SDK ({mode}).",
            }
        }
        made[mode] = MODES[mode](attributes(), data)
    return made


def records(messages: list[Message]) -> list[Record]:
    """Exactly the key, headers and value the SDK made, to produce."""
    return [Record(m.key, m.value, tuple(m.headers.items())) for m in messages]


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def test_sdk_events_of_every_mode_are_mailed(
    tmp_path: Path, kafka_bootstrap: str, topic: str, dlq_topic: str, smtp_server: SmtpRecorder
) -> None:
    made = sdk_messages()
    plain = MODES["v1 structured, data"](
        {"type": "ticketActivity.created", "source": "/sdk", "datacontenttype": "text/plain"},
        "Printer jams again",
    )
    settings = service_settings(
        tmp_path, bootstrap=kafka_bootstrap, topic=topic, smtp_port=smtp_server.port
    )
    async with running_service(settings):
        await produce(kafka_bootstrap, topic, records([plain, *made.values()]))
        await smtp_server.wait_for(len(made), timeout=60)
        [dead_letter] = await read_topic(kafka_bootstrap, dlq_topic, at_least=1)
        headers = dict(dead_letter.headers)
        await asyncio.sleep(1.0)  # anything extra would arrive now

    assert len(smtp_server.messages) == len(made)
    by_activity = {}
    for received in smtp_server.messages:
        assert received.rcpt_tos == ("dana@customer.test",)
        message = parse(received.data)
        # Message-ID is <a.{activity}.{kind}.{hash}@domain>
        _, activity, kind, _ = str(message["Message-ID"]).strip("<>").split("@")[0].split(".")
        assert kind == "customer_update"
        by_activity[activity] = message
    for number, mode in enumerate(made, start=7001):
        message = by_activity[str(number)]
        plain_body = message.get_body(preferencelist=("plain",))
        assert plain_body is not None
        assert f"Status from the SDK ({mode})." in plain_body.get_content()
        assert message["Subject"] == "[T-1042] Printer on floor 3 jams"
    assert headers["x-error-stage"] == b"cloudevent"
    assert headers["x-error-reason"] == (
        b"datacontenttype 'text/plain' is not JSON; only JSON data is served"
    )
    assert json.loads(plain.value)["data"] == "Printer jams again"
