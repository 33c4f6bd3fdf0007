"""Ledger throughput per backend: group-committed records, claims in batches, sent look-ups.

`python -m benchmarks.ledger [--mails N]` runs SQLite (synchronous FULL and NORMAL) and a
throwaway PostgreSQL cluster (devkit/postgres.py; $NOTIFY_TEST_POSTGRES_URL to reuse a
server) in one run, so the ratios between them are measured on the same machine state.

`--flood N,M,...` measures instead what the recipient limit's hourly count costs a claim
under a flood to one address: a claim of 900 keys (9 of them to the flooded address) with
N `throttled` rows of that address in the last hour, the median of a few claims, per backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from devkit.postgres import PostgresCluster, create_database, drop_database
from service.delivery.ledger import (
    ClaimRequest,
    Entry,
    Key,
    LedgerConfig,
    Status,
    create_ledger,
)

CONCURRENCY = 64
CLAIM_BATCH = 64
FLOODED = "flood@x.test"


async def measure(url: str, config: LedgerConfig, mails: int) -> dict[str, float]:
    ledger = create_ledger(url, config)
    await ledger.open()
    keys = [Key(str(i), "staff", f"user{i % 500}@x.test") for i in range(mails)]
    slots = asyncio.Semaphore(CONCURRENCY)
    result: dict[str, float] = {}
    try:
        started = time.perf_counter()
        batches = [keys[i : i + CLAIM_BATCH] for i in range(0, mails, CLAIM_BATCH)]

        async def claim(batch: list[Key]) -> None:
            async with slots:
                await ledger.claim([ClaimRequest(k, "1", "e") for k in batch], "bench", 60, 30)

        await asyncio.gather(*(claim(b) for b in batches))
        result["claims_per_s"] = mails / (time.perf_counter() - started)

        async def record(k: Key) -> None:
            async with slots:
                await ledger.record(Entry(k, Status.SENT, f"<{k[0]}@x>", ticket_id="1"))

        started = time.perf_counter()
        await asyncio.gather(*(record(k) for k in keys))
        result["records_per_s"] = mails / (time.perf_counter() - started)

        started = time.perf_counter()
        for i in range(0, mails, 500):
            await ledger.sent(keys[i : i + 500])
        result["sent_lookups_per_s"] = mails / (time.perf_counter() - started)
    finally:
        await ledger.close()
    return result


async def flood(url: str, config: LedgerConfig, sizes: list[int]) -> dict[str, float]:
    """ms per 900-key claim with each count of `throttled` rows of one address this hour."""
    ledger = create_ledger(url, config)
    await ledger.open()
    result: dict[str, float] = {}
    written = 0
    try:
        for size in sorted(sizes):
            for start in range(written, size, 1000):
                await asyncio.gather(
                    *(
                        ledger.record(Entry(Key(f"f{i}", "customer", FLOODED), Status.THROTTLED))
                        for i in range(start, min(start + 1000, size))
                    )
                )
            written = max(written, size)
            if url.startswith("postgresql"):
                # What autovacuum does on a server as a table grows: without fresh
                # statistics the planner takes 100,000 rows for a few thousand.
                analyze(url)
            times = []
            for round_ in range(5):
                requests = [
                    ClaimRequest(
                        Key(
                            f"c{size}-{round_}-{i}",
                            "staff",
                            FLOODED if i % 100 == 0 else f"u{i}@x.test",
                        ),
                        "1",
                        "e",
                    )
                    for i in range(900)
                ]
                started = time.perf_counter()
                await ledger.claim(requests, "bench", 60, 30)
                times.append(time.perf_counter() - started)
            result[f"claim_ms_at_{size}"] = 1000 * sorted(times)[len(times) // 2]
    finally:
        await ledger.close()
    return result


def analyze(url: str) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("ANALYZE deliveries")


async def run(
    mails: int, postgres_url: str | None, sizes: list[int] | None = None
) -> dict[str, Any]:
    def probe(url: str, config: LedgerConfig) -> Any:
        return flood(url, config, sizes) if sizes else measure(url, config, mails)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        for sync in ("full", "normal"):
            url = f"sqlite:///{Path(work) / f'{sync}.sqlite3'}"
            results[f"sqlite-{sync}"] = await probe(url, LedgerConfig(sqlite_synchronous=sync))
    cluster = None
    if postgres_url is None:
        cluster = PostgresCluster()
        cluster.start()
        postgres_url = cluster.url()
    name = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        url = create_database(postgres_url, name)
        results["postgres"] = await probe(url, LedgerConfig(pool_size=10))
        drop_database(postgres_url, name)
    finally:
        if cluster is not None:
            cluster.remove()
    return results


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mails", type=int, default=5000)
    parser.add_argument("--flood", help="comma-separated counts of throttled rows, e.g. 0,10000")
    args = parser.parse_args()
    sizes = [int(n) for n in args.flood.split(",")] if args.flood else None
    results = asyncio.run(run(args.mails, os.environ.get("NOTIFY_TEST_POSTGRES_URL"), sizes))
    for backend, figures in results.items():
        line = "  ".join(f"{name} {value:8.0f}" for name, value in figures.items())
        print(f"{backend:14} {line}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
