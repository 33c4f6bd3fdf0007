"""How old a record is when its batch starts, with and without the consumer's catch-up poll.

    python -m benchmarks.fetch_age                  # 200 records/s, 60 ms per batch
    python -m benchmarks.fetch_age --cycle-ms 20 --bootstrap 127.0.0.1:9092

A bare aiokafka consumer on a real broker (started from the cached jars unless
`--bootstrap`) polls like FastStream's batch subscriber, then stands for a batch being
served by sleeping `--cycle-ms`. A producer writes `--count` records at `--rate`. For each
setting of the extra poll (none, then each `--catch-up-ms`), the age of every record when
its batch starts: now minus its Kafka timestamp. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devkit.kafka import KafkaNode


async def ages(
    bootstrap: str, rate: float, count: int, cycle: float, catch_up_ms: int | None
) -> list[float]:
    topic = f"fetch-age-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    await producer.send_and_wait(topic, b"warm-up", partition=0)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=topic,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: list[float] = []
    all_seen = asyncio.Event()

    async def consume() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=20, max_records=500)
            if catch_up_ms is not None:
                more = await consumer.getmany(timeout_ms=catch_up_ms, max_records=500)
                for tp, records in more.items():
                    batch.setdefault(tp, []).extend(records)
            now = time.time() * 1000
            seen.extend(
                now - r.timestamp for rs in batch.values() for r in rs if r.value != b"warm-up"
            )
            if len(seen) >= count:
                all_seen.set()
            await asyncio.sleep(cycle)

    task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(2)  # joined and caught up
        started = time.monotonic()
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(topic, b"%d" % i, key=b"%d" % (i % 50))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), timeout=10)
    finally:
        task.cancel()
        await consumer.stop()
        await producer.stop()
    return sorted(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="records/s")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--cycle-ms", type=float, default=60.0, help="time to serve a batch")
    parser.add_argument("--catch-up-ms", type=int, nargs="*", default=[0, 5, 10])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    args = parser.parse_args()
    node = None
    if args.bootstrap is None:
        node = KafkaNode(Path(tempfile.mkdtemp(prefix="fetch-age-")))
        node.start()
    bootstrap = args.bootstrap or (node.bootstrap if node else "")
    try:
        for setting in [None, *args.catch_up_ms]:
            got = asyncio.run(ages(bootstrap, args.rate, args.count, args.cycle_ms / 1000, setting))
            label = "no catch-up" if setting is None else f"catch-up {setting} ms"
            if not got:
                print(f"{label:>16}: no records")
                continue
            p50, p90 = got[len(got) // 2], got[int(len(got) * 0.9)]
            print(
                f"{label:>16}: {len(got)} records, age at batch start p50 {p50:.0f} ms,"
                f" p90 {p90:.0f} ms, max {got[-1]:.0f} ms"
            )
    finally:
        if node is not None:
            node.stop()


if __name__ == "__main__":
    main()
