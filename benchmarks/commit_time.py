"""How long one offsets commit takes, with Kafka's default coordinator linger and without.

    python -m benchmarks.commit_time            # 80 commits against each broker

Kafka 4's group coordinator holds each offsets write up to `group.coordinator.append.linger.ms`
(5 ms by default) to batch it with other groups' writes. This starts a broker from the
cached jars twice, with the devkit's setting (0) and with Kafka's default, and times
aiokafka's `commit()` after each small batch a bare consumer takes. Loopback only, bounded
in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devkit.kafka import KafkaNode

LINGER = "group.coordinator.append.linger.ms=0\n"


class DefaultLingerNode(KafkaNode):
    """The devkit broker with Kafka's own coordinator linger."""

    def server_properties(self) -> str:
        return super().server_properties().replace(LINGER, "")


async def commit_times(bootstrap: str, commits: int) -> list[float]:
    records = commits * 5
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(records):
            await producer.send("commit-time", b"x" * 100, partition=i % 4)
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "commit-time",
        bootstrap_servers=bootstrap,
        group_id="commit-time",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    times: list[float] = []
    try:
        async with asyncio.timeout(120):
            taken = 0
            while taken < records:
                batch = await consumer.getmany(timeout_ms=500, max_records=5)
                taken += sum(len(r) for r in batch.values())
                started = time.perf_counter()
                await consumer.commit()
                times.append(time.perf_counter() - started)
    finally:
        await consumer.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=80)
    args = parser.parse_args()
    for label, node_type in (
        ("linger 0 (devkit)", KafkaNode),
        ("Kafka's default", DefaultLingerNode),
    ):
        with tempfile.TemporaryDirectory(prefix="notifier-commit-time-") as tmp:
            node = node_type(Path(tmp))
            node.start()
            try:
                times = asyncio.run(commit_times(node.bootstrap, args.commits))
            finally:
                node.stop()
        ordered = sorted(times)
        print(
            f"{label:<20} commit() median {1000 * statistics.median(times):.2f} ms, "
            f"p90 {1000 * ordered[int(0.9 * len(ordered))]:.2f} ms ({len(times)} commits)"
        )


if __name__ == "__main__":
    main()
