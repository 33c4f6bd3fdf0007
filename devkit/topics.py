"""Kafka topics for tests and benchmarks: create, produce, read back, inspect consumer groups."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

Headers = tuple[tuple[str, bytes], ...]


def unique_topic(test_name: str) -> str:
    """A topic name no other test uses: 'test-<test name>-<random>'."""
    # Only [a-z0-9-]: Kafka refuses names that differ from another only by '.' versus '_'.
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:80]
    return f"test-{slug}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def kafka_admin(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed when the block ends."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def create_topics(
    bootstrap: str,
    names: Sequence[str],
    partitions: int = 4,
    timeout: float = 30,  # noqa: ASYNC109
) -> None:
    """Create the topics and wait until every partition has a leader."""
    async with kafka_admin(bootstrap) as admin:
        response = await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        errors = [(t, code, msg) for t, code, msg in response.topic_errors if code != 0]
        if errors:
            raise RuntimeError(f"create_topics failed: {errors}")
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(list(names))
            if all(_has_leaders(t, partitions) for t in described):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders after {timeout} s: {described}")
            await asyncio.sleep(0.1)


def _has_leaders(topic: dict[str, Any], partitions: int) -> bool:
    parts = topic.get("partitions", [])
    return (
        topic.get("error_code") == 0
        and len(parts) == partitions
        and all(p.get("leader", -1) >= 0 for p in parts)
    )


class Producible(Protocol):
    """Anything with a key, a value and headers can be produced."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...


@dataclass(frozen=True, slots=True)
class Record:
    """A plain record to produce."""

    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp_ms: int | None = None  # None: the producer's clock (set it to make history)


async def produce(
    bootstrap: str, topic: str, records: Sequence[Producible], linger_ms: int = 5
) -> list[tuple[int, int]]:
    """Send the records in order, all in flight at once; (partition, offset) of each.

    The idempotent producer keeps their order within a partition.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=linger_ms
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic,
                value=r.value,
                key=r.key,
                headers=list(r.headers),
                timestamp_ms=getattr(r, "timestamp_ms", None),
            )
            for r in records
        ]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """A record as read back from a topic."""

    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    def header(self, name: str) -> str | None:
        """The first header called `name`, decoded (bad UTF-8 replaced), or None."""
        for k, v in self.headers:
            if k == name:
                return v.decode("utf-8", "replace")
        return None


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    at_least: int = 0,
    within: float = 30,
) -> list[KafkaRecord]:
    """Every record of the topic up to its end, once at least `at_least` are there.

    No consumer group; ordered by (timestamp, partition, offset). TimeoutError after
    `within` seconds.
    """
    parts = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    if not parts and not at_least:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        # Dead letters of 1 MB poison records must fit in one fetch.
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    records: list[KafkaRecord] = []
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + within
        while True:
            ends = await consumer.end_offsets(parts)
            at_end = [await consumer.position(tp) >= ends[tp] for tp in parts]
            if len(records) >= at_least and all(at_end):
                return sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset))
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {topic}: {len(records)} of {at_least} records after {within} s"
                )
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(
                    KafkaRecord(
                        r.partition,
                        r.offset,
                        r.timestamp,
                        r.key,
                        r.value,
                        tuple((k, bytes(v)) for k, v in r.headers),
                    )
                    for r in batch
                )
    finally:
        await stop_quietly(consumer)


async def stop_quietly(consumer: AIOKafkaConsumer) -> None:
    """consumer.stop(), minus aiokafka's CancelledError when stopped right after start.

    (NoGroupCoordinator.close awaits a task it just cancelled; if that task never ran,
    the await raises CancelledError although nobody cancelled us.)
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


_PARTITIONS: dict[tuple[str, str], list[int]] = {}


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    """The topic's partition ids (cached: tests never change them).

    Not consumer.partitions_for_topic(): a consumer without a subscription has no
    metadata for the topic and answers None.
    """
    if (bootstrap, topic) not in _PARTITIONS:
        async with kafka_admin(bootstrap) as admin:
            described = await admin.describe_topics([topic])
        ids = sorted(p["partition"] for t in described for p in t.get("partitions", []))
        if not ids:
            return []
        _PARTITIONS[bootstrap, topic] = ids
    return _PARTITIONS[bootstrap, topic]


async def group_members(bootstrap: str, group: str) -> tuple[str, list[str]]:
    """(state, member ids) of a consumer group, as the group coordinator sees it."""
    async with kafka_admin(bootstrap) as admin:
        responses = await admin.describe_consumer_groups([group])
    for response in responses:
        for described in response.groups:
            # (error_code, group_id, state, protocol_type, protocol, members[, ...])
            _, group_id, state, _, _, members = described[:6]
            if group_id == group:
                return str(state), sorted(str(m[0]) for m in members)
    return "Unknown", []


async def group_caught_up(bootstrap: str, topic: str, group: str) -> bool:
    """Whether the group has committed every partition of `topic` up to its end."""
    parts = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(parts)
    finally:
        await stop_quietly(consumer)
    async with kafka_admin(bootstrap) as admin:
        committed = await admin.list_consumer_group_offsets(group, partitions=parts)
    return all(tp in committed and committed[tp].offset >= ends[tp] for tp in parts)


async def set_topic_config(bootstrap: str, topic: str, configs: Mapping[str, str]) -> None:
    """Replace the topic's config overrides (AlterConfigs) with `configs`."""
    async with kafka_admin(bootstrap) as admin:
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs=dict(configs))]
        )
    for response in responses:
        for error_code, message, *_ in response.resources:
            if error_code != 0:
                raise RuntimeError(f"alter_configs {topic}: {error_code} {message}")
