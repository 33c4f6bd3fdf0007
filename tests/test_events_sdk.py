"""parse_event on Kafka messages made by the official CloudEvents SDK, in every mode it has.

The SDK has two Kafka bindings: the one of its 1.x API (`cloudevents.v1.kafka`, imported as
`cloudevents.kafka` before 2.0), whose structured mode labels messages with the *data's*
media type (`content-type: application/json`) and sends `data_base64` whenever the data is
marshalled to bytes; and the 2.x core binding (`cloudevents.core.bindings.kafka`), which
labels structured messages `application/cloudevents+json`. Each message is also read back by
the SDK itself (`from_*`), so the two readings are compared, not just ours taken on trust.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from cloudevents.core.bindings import kafka as core_kafka
from cloudevents.core.v1.event import CloudEvent as CoreEvent
from cloudevents.v1 import kafka as legacy_kafka
from cloudevents.v1.http import CloudEvent as LegacyEvent

from service.core.events import ActivityEvent, InvalidEvent, parse_event

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
DATA = {
    "activity": {
        "id": "5001",
        "ticketID": "1042",
        "sendContentByEmail": "Yes",
        "activityText": "Grüße aus Köln\nline two",
    },
    "ticket": {"reference": "T-1042", "subject": "Printer on floor 3 jams"},
}


def attributes(**extra: str) -> dict[str, str]:
    return {
        "type": "ticketActivity.created",
        "source": "/backend/api/v1/ticketActivities",
        "subject": "1042",
        "datacontenttype": "application/json",
        "partitionkey": "1042",
        "traceparent": TRACEPARENT,
        **extra,
    }


def to_bytes(data: Any) -> bytes:
    return json.dumps(data).encode("utf-8")


class Message(NamedTuple):
    """What a Kafka consumer hands the dispatcher: value, headers, key."""

    value: bytes
    headers: dict[str, bytes]
    key: bytes | None


def _message(made: Any) -> Message:
    value = made.value.encode() if isinstance(made.value, str) else bytes(made.value)
    key = made.key.encode() if isinstance(made.key, str) else made.key
    return Message(value, dict(made.headers), key)


# Every mode of both bindings: (name, make message from attributes and data).
Maker = Callable[[dict[str, str], Any], Message]
MODES: dict[str, Maker] = {
    "v1 structured, data": lambda a, d: _message(
        legacy_kafka.to_structured(LegacyEvent.create(a, d))
    ),
    "v1 structured, data_base64": lambda a, d: _message(
        legacy_kafka.to_structured(LegacyEvent.create(a, d), data_marshaller=to_bytes)
    ),
    "v1 binary": lambda a, d: _message(legacy_kafka.to_binary(LegacyEvent.create(a, d))),
    "core structured, data": lambda a, d: _message(core_kafka.to_structured_event(CoreEvent(a, d))),
    "core structured, data_base64": lambda a, d: _message(
        core_kafka.to_structured_event(CoreEvent(a, to_bytes(d)))
    ),
    "core binary": lambda a, d: _message(core_kafka.to_binary_event(CoreEvent(a, d))),
}


def parse(message: Message) -> ActivityEvent:
    return parse_event(message.value, message.headers)


def sdk_reading(name: str, message: Message) -> tuple[str, str, str, Any]:
    """(id, type, subject, data) as the SDK's own Kafka binding reads the message back."""
    if name.startswith("v1"):
        legacy = legacy_kafka.KafkaMessage(message.headers, message.key, message.value)
        if "binary" in name:
            event: Any = legacy_kafka.from_binary(legacy)
        else:
            # The 1.x binding leaves decoded data_base64 as bytes: unmarshal them as JSON.
            event = legacy_kafka.from_structured(
                legacy,
                data_unmarshaller=lambda d: json.loads(d) if isinstance(d, bytes) else d,
            )
        return event["id"], event["type"], event["subject"], event.get_data()
    core = core_kafka.KafkaMessage(message.headers, message.key, message.value)
    read = core_kafka.from_kafka_event(core)
    data = read.get_data()
    return (
        str(read.get_id()),
        str(read.get_type()),
        str(read.get_subject()),
        json.loads(data) if isinstance(data, bytes) else data,
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_sdk_mode_is_served_with_its_extensions(mode: str) -> None:
    message = MODES[mode](attributes(), DATA)
    event = parse(message)
    sdk_id, sdk_type, sdk_subject, sdk_data = sdk_reading(mode, message)
    assert (event.id, event.type, event.subject) == (sdk_id, sdk_type, sdk_subject)
    assert sdk_data == DATA
    assert event.source == "/backend/api/v1/ticketActivities"
    assert event.datacontenttype == "application/json"
    assert event.time is not None
    assert event.time.utcoffset() is not None
    activity = event.data.activity
    assert (activity.id, activity.ticket_id) == ("5001", "1042")
    assert activity.send_content_by_email is True
    assert activity.activity_text == "Grüße aus Köln\nline two"
    assert event.data.ticket is not None
    assert event.data.ticket.reference == "T-1042"
    # The partitionkey extension became the Kafka key: the ticket, as the contract wants.
    assert message.key == b"1042"


def test_the_modes_really_differ() -> None:
    # The matrix above is only worth something if the SDK produced what its name says.
    made = {mode: MODES[mode](attributes(), DATA) for mode in MODES}
    for mode, message in made.items():
        structured = "structured" in mode
        assert ("ce_specversion" in message.headers) is not structured, mode
        if structured:
            body = json.loads(message.value)
            assert ("data_base64" in body) is mode.endswith("data_base64"), mode
            assert ("data" in body) is mode.endswith(", data"), mode
            assert body["traceparent"] == TRACEPARENT
    assert made["v1 structured, data"].headers["content-type"] == b"application/json"
    assert made["core structured, data"].headers["content-type"] == (
        b"application/cloudevents+json"
    )
    assert made["v1 binary"].headers["ce_traceparent"] == TRACEPARENT.encode()


@pytest.mark.parametrize("media_type", ["text/json", "application/vnd.helpdesk+json; v=2"])
@pytest.mark.parametrize("mode", MODES)
def test_other_json_media_types_are_served(mode: str, media_type: str) -> None:
    event = parse(MODES[mode](attributes(datacontenttype=media_type), DATA))
    assert event.datacontenttype == media_type
    assert event.data.activity.id == "5001"


@pytest.mark.parametrize("mode", MODES)
def test_non_json_data_is_a_cloudevent_dead_letter_naming_the_type(mode: str) -> None:
    # Plain text data: the SDK marshals it as it is, and it is not an activity.
    message = MODES[mode](attributes(datacontenttype="text/plain"), "Printer jams again")
    with pytest.raises(InvalidEvent) as caught:
        parse(message)
    assert caught.value.stage == "cloudevent"
    assert caught.value.reason == (
        "datacontenttype 'text/plain' is not JSON; only JSON data is served"
    )


# The 1.x binary binding cannot make a message without datacontenttype (KeyError in the SDK).
@pytest.mark.parametrize("mode", [mode for mode in MODES if mode != "v1 binary"])
def test_an_sdk_event_without_datacontenttype_is_read_as_json(mode: str) -> None:
    plain = {k: v for k, v in attributes().items() if k != "datacontenttype"}
    event = parse(MODES[mode](plain, DATA))
    assert event.data.activity.activity_text == "Grüße aus Köln\nline two"


@pytest.mark.parametrize("mode", MODES)
def test_sdk_events_of_an_unknown_type_still_fail_at_the_type_stage(mode: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse(MODES[mode](attributes(type="com.example.other"), DATA))
    assert caught.value.stage == "type"
