"""The batch handler's catch-up poll and its commits: when it asks, what it serves, what it
commits (and when) or rewinds.

The consumer here is a stand-in with aiokafka's method names, so that the timing (a clock
the test steps) is exact; the real broker's behaviour behind the catch-up is measured in
benchmarks/README.md, and the fault and pipeline suites run this handler on a real broker.
"""

from __future__ import annotations

import asyncio
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
        self.committed: list[dict[int, int]] = []  # partition → next offset, per commit
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

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert set(offsets) <= self.owned  # aiokafka refuses a partition it does not own
        self.commits += 1
        self.committed.append({tp.partition: offset for tp, offset in offsets.items()})

    def assignment(self) -> set[TopicPartition]:
        return self.owned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset


class FakeDispatcher:
    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.fail = False
        self.stopping = False

    async def handle_batch(self, records: Sequence[Record]) -> None:
        self.batches.append([(r.partition, r.offset) for r in records])
        if self.fail:
            raise RetryLater

    def revoke(self, partitions: set[tuple[str, int]]) -> None:
        pass

    async def quiesce(self, partitions: set[tuple[str, int]]) -> None:
        pass


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
    # Every finished batch committed at once: the catch-up tests count one commit per batch.
    handler = BatchConsumer(
        cast(Dispatcher, dispatcher),
        Metrics(CollectorRegistry()),
        10,
        clock=clock,
        commit_interval=0,
    )
    handler.attach(cast(Any, SimpleNamespace(consumer=kafka)))
    return handler, kafka, dispatcher, clock


INTERVAL = 0.05


@pytest.fixture
def spaced() -> tuple[BatchConsumer, FakeConsumer, FakeDispatcher]:
    """A handler that commits at most every INTERVAL seconds, on a loop that runs no catch-up
    (every batch looks fresh to it)."""
    kafka, dispatcher = FakeConsumer([0, 1]), FakeDispatcher()
    ticks = iter(range(10**6))
    handler = BatchConsumer(
        cast(Dispatcher, dispatcher),
        Metrics(CollectorRegistry()),
        10,
        clock=lambda: float(next(ticks)),  # a second between readings: never buffered
        commit_interval=INTERVAL,
    )
    handler.attach(cast(Any, SimpleNamespace(consumer=kafka)))
    return handler, kafka, dispatcher


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


async def test_batches_within_the_interval_are_committed_together_by_the_timer(
    spaced: tuple[BatchConsumer, FakeConsumer, FakeDispatcher],
) -> None:
    handler, kafka, _ = spaced
    await handler.handle(batch(raw(0, 0), raw(1, 4)))
    assert kafka.committed == [{0: 1, 1: 5}]  # the first commit goes at once
    await handler.handle(batch(raw(0, 1)))
    await handler.handle(batch(raw(0, 2), raw(0, 3)))
    assert kafka.commits == 1  # finished, waiting for the interval
    await asyncio.sleep(INTERVAL * 3)
    assert kafka.committed == [{0: 1, 1: 5}, {0: 4}]  # one commit carries both batches


async def test_a_commit_holds_finished_batches_only_never_a_rewound_one(
    spaced: tuple[BatchConsumer, FakeConsumer, FakeDispatcher],
) -> None:
    handler, kafka, dispatcher = spaced
    await handler.handle(batch(raw(0, 0)))
    await handler.handle(batch(raw(0, 1), raw(1, 7)))  # finished, waits for the timer
    dispatcher.fail = True
    await handler.handle(batch(raw(0, 2), raw(1, 8)))  # rewound: read again from there
    assert kafka.seeks == {TopicPartition(TOPIC, 0): 2, TopicPartition(TOPIC, 1): 8}
    await asyncio.sleep(INTERVAL * 3)
    assert kafka.committed == [{0: 1}, {0: 2, 1: 8}]


@pytest.mark.parametrize("how", ["revoked", "gone from the assignment"])
async def test_the_offsets_of_a_lost_partition_are_not_committed(
    spaced: tuple[BatchConsumer, FakeConsumer, FakeDispatcher], how: str
) -> None:
    handler, kafka, _ = spaced
    await handler.handle(batch(raw(0, 0)))
    await handler.handle(batch(raw(0, 1), raw(1, 7)))
    lost = TopicPartition(TOPIC, 1)
    if how == "revoked":  # still in the fake's assignment: only the listener drops it
        await handler.listener.on_partitions_revoked({lost})
    else:  # lost without a revocation (yet): the commit leaves it out
        kafka.owned = kafka.owned - {lost}
    await asyncio.sleep(INTERVAL * 3)
    assert kafka.committed == [{0: 1}, {0: 2}]  # the new owner reads 1:7 again


async def test_on_shutdown_a_finished_batch_is_committed_at_once(
    spaced: tuple[BatchConsumer, FakeConsumer, FakeDispatcher],
) -> None:
    handler, kafka, dispatcher = spaced
    await handler.handle(batch(raw(0, 0)))
    await handler.handle(batch(raw(0, 1)))
    dispatcher.stopping = True
    await handler.handle(batch(raw(0, 2)))
    assert kafka.committed == [{0: 1}, {0: 3}]
    await handler.flush()  # what stop_consuming calls: nothing is left to commit
    assert kafka.commits == 2
