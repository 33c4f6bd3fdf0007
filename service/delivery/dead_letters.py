"""Dead letters: a record that cannot be served goes to its own topic, with the reason."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from service.core.failures import Failure

log = logging.getLogger("service.delivery.dead_letters")

# A dead letter keeps at most this much of an oversized value (the original stays
# readable on the main topic at x-original-offset while retention lasts).
TRUNCATED_BYTES = 64 * 1024
# Headers the dead-letter path adds; a replayed record goes back without them.
ADDED_PREFIXES = ("x-error-", "x-original-")
# FastStream publishes header values as text: a value that is not UTF-8 travels base64-encoded
# under this prefix, and `original_headers` turns it back into its bytes on replay.
BINARY_PREFIX = "x-original-binary."


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


def dead_letter_headers(record: Record, failure: Failure) -> dict[str, str]:
    """The record's own headers plus `x-error-*` and `x-original-*` (values as text)."""
    headers: dict[str, str] = {}
    for name, value in record.headers:
        if name.startswith("x-error-"):
            continue
        try:
            headers[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            headers[BINARY_PREFIX + name] = base64.b64encode(value).decode("ascii")
    headers["x-error-stage"] = failure.stage.value
    headers["x-error-reason"] = failure.reason
    headers["x-original-topic"] = record.topic
    headers["x-original-partition"] = str(record.partition)
    headers["x-original-offset"] = str(record.offset)
    return headers


def original_headers(headers: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """A dead letter's headers as the original record had them (for `notifier dlq replay`)."""
    restored = []
    for name, value in headers:
        if name.startswith(BINARY_PREFIX):
            restored.append((name.removeprefix(BINARY_PREFIX), base64.b64decode(value)))
        elif not name.startswith(ADDED_PREFIXES):
            restored.append((name, value))
    return restored


class Publisher(Protocol):
    """What KafkaDeadLetters needs of a FastStream publisher (`broker.publisher(topic)`)."""

    async def publish(
        self, message: Any, /, *, key: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Any: ...


class KafkaDeadLetters:
    """Publishes dead letters through the broker's FastStream publisher for the DLQ topic."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def send(self, record: Record, failure: Failure) -> None:
        headers = dead_letter_headers(record, failure)
        try:
            try:
                await self._publisher.publish(record.value, key=record.key, headers=headers)
            except MessageSizeTooLargeError:
                # Our headers pushed a value near the size limit over it: the reason and
                # the coordinates matter more than the bytes, which the main topic keeps.
                size = len(record.value or b"")
                await self._publisher.publish(
                    (record.value or b"")[:TRUNCATED_BYTES],
                    key=record.key,
                    headers={**headers, "x-error-truncated": str(size)},
                )
        except KafkaError as exc:
            # The record cannot be committed before its dead letter is stored: retry later.
            log.warning("dead letter not stored", extra={"error": type(exc).__name__})
            raise RetryLater from exc
