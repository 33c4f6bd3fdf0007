"""Ledger throughput per backend: group-committed records, claims in batches, sent look-ups.

`python -m benchmarks.ledger [--mails N]` runs SQLite (synchronous FULL and NORMAL) and a
throwaway PostgreSQL cluster (devkit/postgres.py; $NOTIFY_TEST_POSTGRES_URL to reuse a
server) in one run, so the ratios between them are measured on the same machine state.
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


async def run(mails: int, postgres_url: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        for sync in ("full", "normal"):
            url = f"sqlite:///{Path(work) / f'{sync}.sqlite3'}"
            results[f"sqlite-{sync}"] = await measure(
                url, LedgerConfig(sqlite_synchronous=sync), mails
            )
    cluster = None
    if postgres_url is None:
        cluster = PostgresCluster()
        cluster.start()
        postgres_url = cluster.url()
    name = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        url = create_database(postgres_url, name)
        results["postgres"] = await measure(url, LedgerConfig(pool_size=10), mails)
        drop_database(postgres_url, name)
    finally:
        if cluster is not None:
            cluster.remove()
    return results


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mails", type=int, default=5000)
    args = parser.parse_args()
    results = asyncio.run(run(args.mails, os.environ.get("NOTIFY_TEST_POSTGRES_URL")))
    for backend, figures in results.items():
        line = "  ".join(f"{name} {value:8.0f}" for name, value in figures.items())
        print(f"{backend:14} {line}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
