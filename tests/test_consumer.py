"""The batch handler's catch-up poll: when it asks, what it serves, what it commits or rewinds.

The consumer here is a stand-in with aiokafka's method names, so that the timing (a clock
the test steps) is exact; the real broker's behaviour behind the catch-up is measured in
benchmarks/README.md, and the fault and pipeline suites run this handler on a real broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from service.delivery.dead_letters import Record, RetryLater
from service.delivery.dispatch import Dispatcher
from service.runtime.consumer import BUSY_SECONDS, CATCH_UP_MS, BatchConsumer
from service.runtime.metrics import Metrics

TOPIC = "activities"


def raw(partition: int, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, b"k", b"{}", None, 1, 2, [("h", b"v")])


class FakeConsumer:
    """aiokafka's AIOKafkaConsumer, as far as the handler uses it."""

    def __init__(self, partitions: Sequence[int]) -> None:
        self.owned = {TopicPartition(TOPIC, p) for p in partitions}
        self.waiting: list[ConsumerRecord[bytes, bytes]] = []
        self.polls: list[tuple[int, int]] = []
        self.commits = 0
        self.seeks: dict[TopicPartition, int] = {}
        self.fail_poll = False

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        self.polls.append((timeout_ms, max_records))
        if self.fail_poll:
            raise KafkaTimeoutError
        taken, self.waiting = self.waiting[:max_records], self.waiting[max_records:]
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for record in taken:
            out.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        return out

    async def commit(self) -> None:
        self.commits += 1

    def assignment(self) -> set[TopicPartition]:
        return self.owned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset


class FakeDispatcher:
    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.fail = False

    async def handle_batch(self, records: Sequence[Record]) -> None:
        self.batches.append([(r.partition, r.offset) for r in records])
        if self.fail:
            raise RetryLater


class Clock:
    """Monotonic seconds the test sets: each handled batch reads it when it begins and ends."""

    def __init__(self) -> None:
        self.readings: list[float] = []

    def then(self, *moments: float) -> None:
        self.readings.extend(moments)

    def __call__(self) -> float:
        return self.readings.pop(0)


@pytest.fixture
def parts() -> tuple[BatchConsumer, FakeConsumer, FakeDispatcher, Clock]:
    kafka, dispatcher, clock = FakeConsumer([0, 1]), FakeDispatcher(), Clock()
    handler = BatchConsumer(
        cast(Dispatcher, dispatcher), Metrics(CollectorRegistry()), 10, clock=clock
    )
    handler.attach(cast(Any, SimpleNamespace(consumer=kafka)))
    return handler, kafka, dispatcher, clock


def batch(*records: ConsumerRecord[bytes, bytes]) -> Any:
    return SimpleNamespace(raw_message=records)


async def test_a_batch_that_waited_in_the_buffer_is_served_with_what_arrived_since(
    parts: tuple[BatchConsumer, FakeConsumer, FakeDispatcher, Clock],
) -> None:
    handler, kafka, dispatcher, clock = parts
    clock.then(10.0, 10.0 + 2 * BUSY_SECONDS)  # a batch that kept the loop busy
    await handler.handle(batch(raw(0, 0)))
    kafka.waiting = [raw(0, 2), raw(1, 7)]
    clock.then(10.0 + 2 * BUSY_SECONDS + 0.001, 11.0)  # the next one was already buffered
    await handler.handle(batch(raw(0, 1)))
    assert kafka.polls == [(CATCH_UP_MS, 9)]  # room for the rest of one batch
    assert dispatcher.batches == [[(0, 0)], [(0, 1), (0, 2), (1, 7)]]
    assert kafka.commits == 2  # each after its batch, the catch-up's records with it


async def test_a_batch_the_poll_waited_for_is_served_at_once(
    parts: tuple[BatchConsumer, FakeConsumer, FakeDispatcher, Clock],
) -> None:
    handler, kafka, dispatcher, clock = parts
    kafka.waiting = [raw(0, 2)]
    clock.then(10.0, 10.5)
    await handler.handle(batch(raw(0, 0)))
    clock.then(10.6, 10.7)  # the poll waited 100 ms: what it brought is fresh
    await handler.handle(batch(raw(0, 1)))
    clock.then(10.7005, 10.8)  # buffered behind a batch that took 100 ms: it catches up
    await handler.handle(batch(raw(0, 3)))
    assert kafka.polls == [(CATCH_UP_MS, 9)]
    assert dispatcher.batches == [[(0, 0)], [(0, 1)], [(0, 3), (0, 2)]]


async def test_no_catch_up_after_a_quick_batch_or_for_a_full_one(
    parts: tuple[BatchConsumer, FakeConsumer, FakeDispatcher, Clock],
) -> None:
    handler, kafka, dispatcher, clock = parts
    kafka.waiting = [raw(0, 20)]
    clock.then(10.0, 10.001)  # served in a millisecond: its successor is that fresh
    await handler.handle(batch(raw(0, 0)))
    clock.then(10.0011, 10.5)
    await handler.handle(batch(raw(0, 1)))
    clock.then(10.5001, 10.6)  # buffered after a busy batch, but already full
    await handler.handle(batch(*(raw(1, i) for i in range(10))))
    assert kafka.polls == []
    assert len(dispatcher.batches[-1]) == 10


async def test_a_failed_catch_up_serves_the_batch_as_it_is(
    parts: tuple[BatchConsumer, FakeConsumer, FakeDispatcher, Clock],
) -> None:
    handler, kafka, dispatcher, clock = parts
    kafka.fail_poll = True
    clock.then(10.0, 10.5, 10.5001, 10.6)
    await handler.handle(batch(raw(0, 0)))
    await handler.handle(batch(raw(0, 1)))
    assert len(kafka.polls) == 1
    assert dispatcher.batches == [[(0, 0)], [(0, 1)]]
    assert kafka.commits == 2


async def test_a_failed_batch_rewinds_what_the_catch_up_took_too(
    parts: tuple[BatchConsumer, FakeConsumer, FakeDispatcher, Clock],
) -> None:
    handler, kafka, dispatcher, clock = parts
    clock.then(10.0, 10.5, 10.5001, 10.6)
    await handler.handle(batch(raw(0, 0)))
    kafka.waiting = [raw(1, 7), raw(1, 8)]
    dispatcher.fail = True
    await handler.handle(batch(raw(0, 1)))
    assert dispatcher.batches[-1] == [(0, 1), (1, 7), (1, 8)]
    # Partition 1 came only through the catch-up: it is read again from there.
    assert kafka.seeks == {TopicPartition(TOPIC, 0): 1, TopicPartition(TOPIC, 1): 7}
    assert kafka.commits == 1
