"""Tests of producer.publisher and `notifier publish`: pure encoding, then the real broker."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from devkit.topics import KafkaRecord, read_topic
from service.cli.producer import add_producer_commands, prepare, read_items
from service.core.events import STRUCTURED_CONTENT_TYPE, InvalidEvent, Ticket, parse_event
from service.producer.publisher import (
    InvalidActivity,
    Publisher,
    build_event,
    encode_event,
    event_type,
    validate_activity,
)

ACTIVITY = {
    "id": "5001",
    "ticketID": "1042",
    "sendContentByEmail": {"id": 2, "name": "Yes"},
    "activityText": "Your printer is fixed.",
    "activityDepartments": "support; sales",
}
TICKET = Ticket.model_validate(
    {
        "id": "1042",
        "reference": "T-1042",
        "subject": "Printer on floor 3 jams",
        "customer": {"name": "Dana Smith", "email": "dana@customer.test", "locale": "de"},
    }
)


def parsed(record: KafkaRecord) -> Any:
    """The record exactly as the consumer parses it."""
    return parse_event(record.value, {k: bytes(v) for k, v in record.headers})


# --- pure -----------------------------------------------------------------------------------


def test_build_event_is_a_structured_cloudevent_keyed_by_ticket() -> None:
    out = build_event(ACTIVITY, type="updated", ticket=TICKET)
    event = json.loads(out.value)
    assert out.key == b"1042"
    assert dict(out.headers) == {"content-type": STRUCTURED_CONTENT_TYPE.encode()}
    assert event["specversion"] == "1.0"
    assert event["source"] == "/backend/api/v1/ticketActivities"
    assert event["type"] == "ticketActivity.updated"
    assert event["subject"] == "1042"
    assert event["datacontenttype"] == "application/json"
    assert event["time"].endswith("Z")
    assert uuid.UUID(event["id"]).version == 4
    # data.activity is the activity exactly as given (the backend's preset object kept).
    assert event["data"]["activity"] == ACTIVITY
    assert event["data"]["ticket"]["customer"]["email"] == "dana@customer.test"
    assert parse_event(out.value, dict(out.headers)).data.activity.send_content_by_email is True


def test_build_event_takes_id_time_and_an_activity_model() -> None:
    moment = dt.datetime(2026, 11, 27, 9, 15, tzinfo=dt.UTC)
    activity = validate_activity({"id": 7, "ticketID": 42})
    out = build_event(activity, event_id="e-1", time=moment)
    event = json.loads(out.value)
    assert (event["id"], event["time"], event["subject"]) == ("e-1", "2026-11-27T09:15:00Z", "42")
    assert out.key == b"42"
    assert event["data"]["activity"]["ticketID"] == "42"


@pytest.mark.parametrize(
    ("activity", "field"),
    [
        ({"ticketID": "1"}, "id"),
        ({"id": "1"}, "ticketID"),
        ({"id": "1", "ticketID": "1", "sendContentByEmail": "maybe"}, "sendContentByEmail"),
        ({"id": "1", "ticketID": "1", "followupTime": "25:00"}, "followupTime"),
        (["not", "an", "object"], "activity"),
    ],
)
def test_a_bad_activity_names_the_field(activity: Any, field: str) -> None:
    with pytest.raises(InvalidActivity) as caught:
        build_event(activity)
    assert caught.value.field == field


def test_a_ticket_of_another_ticket_is_refused() -> None:
    with pytest.raises(InvalidActivity) as caught:
        build_event({**ACTIVITY, "ticketID": "9"}, ticket=TICKET)
    assert caught.value.field == "ticketID"


def test_event_type_accepts_short_and_full_names() -> None:
    assert event_type("created") == "ticketActivity.created"
    assert event_type("ticketActivity.updated") == "ticketActivity.updated"
    with pytest.raises(ValueError):
        event_type("deleted")


def test_encode_event_checks_with_parse_event() -> None:
    good = json.loads(build_event(ACTIVITY).value)
    assert encode_event(good).key == b"1042"
    with pytest.raises(InvalidEvent) as caught:
        encode_event({**good, "type": "ticketActivity.deleted"})
    assert caught.value.stage == "type"
    with pytest.raises(InvalidEvent) as caught:
        encode_event({**good, "data": {"activity": {"id": "1"}}})
    assert "ticketID" in caught.value.reason


def test_read_items_takes_a_document_an_array_or_json_lines() -> None:
    assert read_items('{"id": "1"}') == [{"id": "1"}]
    assert read_items('[{"id": "1"}, {"id": "2"}]') == [{"id": "1"}, {"id": "2"}]
    assert read_items('{"id": "1"}\n\n{"id": "2"}\n') == [{"id": "1"}, {"id": "2"}]


def test_prepare_reports_every_bad_item_by_number_and_field() -> None:
    event = json.loads(build_event(ACTIVITY).value)
    items = [ACTIVITY, {"id": "2"}, event, {**event, "specversion": "0.3"}, 5]
    outgoing, errors = prepare(items, "created", None)
    assert len(outgoing) == 2
    assert errors[0] == "item 2: ticketID: missing"
    assert errors[1].startswith("item 4: cloudevent: specversion")
    assert errors[2] == "item 5: item: not a JSON object"


def test_publish_sends_nothing_when_one_item_is_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The broker address is unreachable: validation must fail before any connection.
    monkeypatch.setenv("NOTIFY_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps(ACTIVITY) + "\n" + json.dumps({"id": "2", "ticketID": []}))
    assert _cli(["publish", str(source)]) == 1
    err = capsys.readouterr().err
    assert "item 2: ticketID:" in err
    assert "nothing sent" in err


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="notifier")
    add_producer_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


# --- on the real broker ---------------------------------------------------------------------


@pytest.mark.integration
async def test_published_events_parse_exactly_as_the_consumer_expects(
    kafka_bootstrap: str, topic: str
) -> None:
    async with Publisher(kafka_bootstrap, topic) as publisher:
        first = await publisher.publish(ACTIVITY, ticket=TICKET)
        second = await publisher.publish({**ACTIVITY, "id": "5002"}, type="updated")
        [third] = await publisher.send(
            [encode_event(json.loads(build_event({**ACTIVITY, "id": "5003"}).value))]
        )
    assert (first.topic, second.partition, third.partition) == (
        topic,
        first.partition,
        first.partition,
    )
    assert second.offset == first.offset + 1
    records = await read_topic(kafka_bootstrap, topic, at_least=3)
    assert [r.key for r in records] == [b"1042"] * 3
    for record in records:
        assert dict(record.headers)["content-type"] == STRUCTURED_CONTENT_TYPE.encode()
        assert json.loads(record.value)["specversion"] == "1.0"  # structured mode
    events = [parsed(r) for r in records]
    assert [e.type for e in events] == [
        "ticketActivity.created",
        "ticketActivity.updated",
        "ticketActivity.created",
    ]
    assert [e.data.activity.id for e in events] == ["5001", "5002", "5003"]
    assert events[0].data.ticket == TICKET
    assert events[1].data.ticket is None
    assert all(e.subject == "1042" for e in events)


@pytest.mark.integration
async def test_a_bad_activity_is_not_sent(kafka_bootstrap: str, topic: str) -> None:
    async with Publisher(kafka_bootstrap, topic) as publisher:
        with pytest.raises(InvalidActivity):
            await publisher.publish({"id": "1", "ticketID": "1", "sendUpdateByEmail": "perhaps"})
        await publisher.publish(ACTIVITY)
    records = await read_topic(kafka_bootstrap, topic, at_least=1)
    assert [parsed(r).data.activity.id for r in records] == ["5001"]


@pytest.mark.integration
def test_cli_publish_prints_offsets(
    kafka_bootstrap: str,
    topic: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NOTIFY_KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("NOTIFY_TOPIC", topic)
    ticket = tmp_path / "ticket.json"
    ticket.write_text(TICKET.model_dump_json())
    items = tmp_path / "items.json"
    event = json.loads(build_event({**ACTIVITY, "id": "9"}, type="updated").value)
    items.write_text(json.dumps([ACTIVITY, event]))
    assert _cli(["publish", str(items), "--type", "updated", "--ticket-json", str(ticket)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        name, partition, offset = line.split()
        assert name == topic
        assert int(partition) in range(4)
        assert int(offset) >= 0
    records = asyncio.run(read_topic(kafka_bootstrap, topic, at_least=2))
    events = sorted((parsed(r) for r in records), key=lambda e: e.data.activity.id)
    assert [(e.data.activity.id, e.type) for e in events] == [
        ("5001", "ticketActivity.updated"),
        ("9", "ticketActivity.updated"),
    ]
    assert events[0].data.ticket == TICKET
    assert events[1].data.ticket is None  # a ready CloudEvent is published as it is
