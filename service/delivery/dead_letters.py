"""Dead letters: a record that cannot be served goes to its own topic, with the reason."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from service.core.failures import Failure

log = logging.getLogger("service.delivery.dead_letters")

# A dead letter keeps at most this much of an oversized value (the original stays
# readable on the main topic at x-original-offset while retention lasts).
TRUNCATED_BYTES = 64 * 1024
# Headers the dead-letter path adds; a replayed record goes back without them.
ADDED_PREFIXES = ("x-error-", "x-original-")


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record, independent of the client library that fetched it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    @property
    def where(self) -> tuple[str, int, int]:
        """(topic, partition, offset)."""
        return (self.topic, self.partition, self.offset)


class RetryLater(Exception):
    """A transient failure outlived the in-process retry budget: rewind, commit nothing."""


class DeadLetterSink(Protocol):
    """Where records that cannot be served go, with the reason."""

    async def send(self, record: Record, failure: Failure) -> None:
        """Store the dead letter durably, or raise RetryLater."""
        ...


def dead_letter_headers(record: Record, failure: Failure) -> list[tuple[str, bytes]]:
    """The record's own headers, byte for byte, plus `x-error-*` and `x-original-*`."""
    return [
        *((k, v) for k, v in record.headers if not k.startswith("x-error-")),
        ("x-error-stage", failure.stage.value.encode()),
        ("x-error-reason", failure.reason.encode()),
        ("x-original-topic", record.topic.encode()),
        ("x-original-partition", str(record.partition).encode()),
        ("x-original-offset", str(record.offset).encode()),
    ]


def original_headers(headers: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """A dead letter's headers as the original record had them (for `notifier dlq replay`)."""
    return [(k, v) for k, v in headers if not k.startswith(ADDED_PREFIXES)]


class KafkaDeadLetters:
    """Publishes dead letters with the original key, value and headers plus the reason.

    Its own aiokafka producer rather than FastStream's publisher: the contract asks for the
    original headers, and FastStream's publisher adds `content-type` and `correlation_id`
    headers and can only carry header values that are UTF-8 text.
    """

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        # aiokafka binds a producer to the running loop, so it is made here, not earlier.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap_servers, acks="all", enable_idempotence=True
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def send(self, record: Record, failure: Failure) -> None:
        if self._producer is None:
            raise RuntimeError("dead-letter producer not started")
        headers = dead_letter_headers(record, failure)
        try:
            try:
                await self._producer.send_and_wait(
                    self._topic, value=record.value, key=record.key, headers=headers
                )
            except MessageSizeTooLargeError:
                # Our headers pushed a value near the size limit over it: the reason and
                # the coordinates matter more than the bytes, which the main topic keeps.
                size = len(record.value or b"")
                await self._producer.send_and_wait(
                    self._topic,
                    value=(record.value or b"")[:TRUNCATED_BYTES],
                    key=record.key,
                    headers=[*headers, ("x-error-truncated", str(size).encode())],
                )
        except KafkaError as exc:
            # The record cannot be committed before its dead letter is stored: retry later.
            log.warning("dead letter not stored", extra={"error": type(exc).__name__})
            raise RetryLater from exc
