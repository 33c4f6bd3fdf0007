"""Publishing ticket activities to Kafka as structured-mode CloudEvents keyed by ticket id."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from service.core.events import (
    DEFAULT_SOURCE,
    STRUCTURED_CONTENT_TYPE,
    Activity,
    EventType,
    Ticket,
    cloudevent_for,
    parse_event,
)

HEADERS: tuple[tuple[str, bytes], ...] = (("content-type", STRUCTURED_CONTENT_TYPE.encode()),)


class InvalidActivity(ValueError):
    """An activity that the consumer would dead-letter; `field` names the culprit (API name)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True, slots=True)
class Published:
    """Where Kafka stored one event (the fields of aiokafka's RecordMetadata we report)."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One encoded event, ready to send: key, value and headers as Kafka takes them."""

    event_id: str
    activity_id: str
    ticket_id: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = HEADERS


def validate_activity(activity: Activity | Mapping[str, Any]) -> Activity:
    """The activity as the consumer will read it; raise InvalidActivity naming the first field."""
    if isinstance(activity, Activity):
        return activity
    if not isinstance(activity, Mapping):
        raise InvalidActivity("activity", "not a JSON object")
    try:
        return Activity.model_validate(activity)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "activity"
        reason = "missing" if error["type"] == "missing" else error["msg"]
        raise InvalidActivity(field, reason) from None


def event_type(kind: str) -> EventType:
    """`created`/`updated` (or the full CloudEvent type) as the CloudEvent type."""
    if kind in ("created", "ticketActivity.created"):
        return "ticketActivity.created"
    if kind in ("updated", "ticketActivity.updated"):
        return "ticketActivity.updated"
    raise ValueError(f"unknown activity event type: {kind!r} (created or updated)")


def build_event(
    activity: Activity | Mapping[str, Any],
    *,
    type: str = "created",
    ticket: Ticket | None = None,
    source: str = DEFAULT_SOURCE,
    event_id: str | None = None,
    time: dt.datetime | None = None,
) -> Outgoing:
    """Validate the activity and encode its CloudEvent; nothing is sent.

    A Mapping is sent as given (data.activity is the activity "exactly as the backend API
    returns it", contract section 1); an Activity is sent in its wire shape.
    """
    valid = validate_activity(activity)
    if ticket is not None and ticket.id != valid.ticket_id:
        raise InvalidActivity("ticketID", f"does not match the ticket given ({ticket.id})")
    wire = activity if isinstance(activity, Activity) else to_jsonable_python(dict(activity))
    event = cloudevent_for(
        wire, type=event_type(type), source=source, ticket=ticket, event_id=event_id, time=time
    )
    # The subject is the ticket id as the consumer reads it (ids may arrive as numbers).
    event["subject"] = valid.ticket_id
    return encode_event(event)


def encode_event(event: Mapping[str, Any]) -> Outgoing:
    """Encode a CloudEvent and check it parses exactly as the consumer will parse it.

    Raises service.core.events.InvalidEvent (its reason names the field) for a bad event.
    """
    value = json.dumps(
        to_jsonable_python(dict(event)), ensure_ascii=False, separators=(",", ":")
    ).encode()
    headers = dict(HEADERS)
    parsed = parse_event(value, headers)
    ticket_id = parsed.data.activity.ticket_id
    return Outgoing(
        event_id=parsed.id,
        activity_id=parsed.data.activity.id,
        ticket_id=ticket_id,
        key=ticket_id.encode(),
        value=value,
    )


class Publisher:
    """An idempotent producer (acks=all) of activity events; use as an async context manager."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        client_id: str = "ticket-notifier-publisher",
        request_timeout_ms: int = 30_000,
    ) -> None:
        self.topic = topic
        # acks=all + idempotence: an acknowledged event survives a leader change, and the
        # producer's own retries cannot write it twice or out of order within a partition.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=request_timeout_ms,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def publish(
        self,
        activity: Activity | Mapping[str, Any],
        *,
        type: str = "created",
        ticket: Ticket | None = None,
        source: str = DEFAULT_SOURCE,
        event_id: str | None = None,
        time: dt.datetime | None = None,
    ) -> Published:
        """Validate, build and send one activity's event; return where Kafka stored it."""
        outgoing = build_event(
            activity, type=type, ticket=ticket, source=source, event_id=event_id, time=time
        )
        return (await self.send([outgoing]))[0]

    async def send(self, events: Sequence[Outgoing]) -> list[Published]:
        """Send encoded events, all in flight at once; return when Kafka acknowledged every one.

        With idempotence the in-flight events keep their order within a partition, so one
        ticket's events stay in the order given. If any send fails this raises, and some of
        the others may have been stored: callers resend the whole batch (at least once).
        """
        futures = [
            await self._producer.send(self.topic, key=e.key, value=e.value, headers=list(e.headers))
            for e in events
        ]
        results = await asyncio.gather(*futures)
        return [Published(r.topic, r.partition, r.offset) for r in results]
