"""`notifier dlq replay`: send dead letters back to the main topic."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.delivery.dead_letters import original_headers
from service.delivery.dispatch import REPLAYED_STAGE
from service.runtime.settings import Settings

REPLAY_HEADERS = ("x-replayed-from", REPLAYED_STAGE)


def replay_headers(
    headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...], origin: str
) -> list[tuple[str, bytes]]:
    """The record's original headers, plus where the replay came from and its stage there.

    The stage lets the consumer release a `throttled` mail without throttling it again.
    """
    stage = dict(headers).get("x-error-stage", b"")
    kept = [(k, v) for k, v in original_headers(headers) if k not in REPLAY_HEADERS]
    return [*kept, ("x-replayed-from", origin.encode()), (REPLAYED_STAGE, stage)]


def matches(headers: dict[str, bytes], stage: str | None, contains: str | None) -> bool:
    if stage is not None and headers.get("x-error-stage", b"").decode(errors="replace") != stage:
        return False
    reason = headers.get("x-error-reason", b"").decode(errors="replace")
    return contains is None or contains in reason


async def replay(
    settings: Settings,
    *,
    stage: str | None = None,
    contains: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
) -> int:
    """Scan the dead-letter topic up to its current end and re-publish matching records.

    The scan keeps no cursor: replaying twice publishes twice, and the consumer's ledger
    keeps either from sending a mail that already went out.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", enable_idempotence=True
    )
    await consumer.start()
    await producer.start()
    count = 0
    try:
        # A consumer with no subscription has no metadata for the topic; the producer
        # fetches it on demand.
        partitions = [
            TopicPartition(settings.dlq_topic, p)
            for p in sorted(await producer.partitions_for(settings.dlq_topic) or ())
        ]
        if not partitions:
            return 0
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining and (limit is None or count < limit):
            batches = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp] or (limit is not None and count >= limit):
                        break
                    headers = {k: bytes(v) for k, v in record.headers}
                    if not matches(headers, stage, contains):
                        continue
                    count += 1
                    if not dry_run:
                        origin = f"{tp.topic}/{tp.partition}/{record.offset}"
                        await producer.send_and_wait(
                            settings.topic,
                            key=record.key,
                            value=record.value,
                            headers=replay_headers(list(record.headers), origin),
                        )
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await producer.stop()
        await consumer.stop()
    return count
