"""The delivery audit at size: ticket queries on a ledger of a million rows, both backends.

`python -m benchmarks.audit [--rows 1000000] [--queries 300] [--backend sqlite|postgres]`
fills a SQLite ledger and a throwaway PostgreSQL one (devkit/postgres.py; or the server
$NOTIFY_TEST_POSTGRES_URL names) with `--rows` deliveries spread over tickets of about ten
rows each, one busy ticket of 5,000, ticket references and some dead letters; then times,
for random tickets:

- `ledger`: `Ledger.deliveries(DeliveryQuery(ticket=...))`, the audit's query;
- `http`: `GET /deliveries?ticket=...` through the audit app (ASGI, no socket): the query
  plus token check, validation and JSON;
- `page`: `find_tickets` by reference, what /ui/ and `notifier deliveries` do (reference
  look-up, deliveries, dead letters);
- `busy`: the busy ticket's newest 100 of 5,000;

and prints p50/p95 in milliseconds with the plan the database chose for the ticket
query (EXPLAIN), which must use ix_deliveries_ticket_at. The rows are written with bulk
SQL (COPY, executemany): filling a million through the group commit would only time the
fill. Results go to benchmarks/out/audit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client import CollectorRegistry

from devkit.postgres import PostgresCluster, create_database, drop_database
from service.delivery.ledger import DeliveryQuery, Ledger, LedgerConfig, create_ledger
from service.delivery.ledger.pgsql import pg
from service.delivery.ledger.rows import audit_sql
from service.runtime.audit.api import create_audit_app
from service.runtime.audit.report import find_tickets
from service.runtime.metrics import Metrics

OUT = Path(__file__).resolve().parent / "out"
TOKEN = "benchmark-token-0123456789"
ROWS_PER_TICKET = 10
BUSY_ROWS = 5000
TARGET_MS = 50.0
KINDS = ("customer_content", "customer_update", "staff", "supplier")
STATUSES = ("sent",) * 16 + ("failed", "withheld", "unresolved", "expired")
COLUMNS = (
    "activity_id",
    "kind",
    "recipient",
    "moment",
    "ticket_id",
    "event_id",
    "status",
    "message_id",
    "stage",
    "reason",
    "created_at",
    "at",
)


def tickets_for(rows: int) -> int:
    return max(1, (rows - BUSY_ROWS) // ROWS_PER_TICKET)


def delivery_rows(rows: int, now: float) -> Iterator[tuple[Any, ...]]:
    """`rows` deliveries over the last 30 days: tickets t0..tN of ~10 rows, and `busy`."""
    rng = random.Random(42)
    tickets = tickets_for(rows)
    for i in range(rows):
        ticket = "busy" if i < BUSY_ROWS else f"t{rng.randrange(tickets)}"
        at = now - rng.uniform(0, 30 * 86400)
        status = rng.choice(STATUSES)
        recipient = f"user{rng.randrange(20_000)}@customer.test"
        message_id = f"<a.{i}.staff.{i:016x}@helpdesk.test>" if status == "sent" else None
        reason = "smtp: 550 5.1.1 no such user" if status == "failed" else None
        kind = KINDS[i % len(KINDS)]
        yield (
            str(i),
            kind,
            recipient,
            "",
            ticket,
            f"e{i}",
            status,
            message_id,
            None,
            reason,
            at,
            at,
        )


def reference_rows(rows: int, now: float) -> Iterator[tuple[str, str, float]]:
    for i in range(tickets_for(rows)):
        yield (f"t{i}", f"T-{i}", now)
    yield ("busy", "T-BUSY", now)


def dead_letter_rows(rows: int, now: float) -> Iterator[tuple[Any, ...]]:
    for i in range(0, tickets_for(rows), 100):
        yield ("ticket-activities", i % 4, i, f"t{i}", f"e{i}", "render", "render: bad", now)


INSERT_DELIVERY = f"INSERT INTO deliveries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 12)})"
INSERT_TICKET = "INSERT INTO tickets (ticket_id, reference, at) VALUES (?, ?, ?)"
INSERT_DEAD_LETTER = (
    'INSERT INTO dead_letters (topic, partition, "offset", ticket_id, event_id, stage, reason,'
    " at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def fill_sqlite(path: str, rows: int, now: float) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.executemany(INSERT_DELIVERY, delivery_rows(rows, now))
        db.executemany(INSERT_TICKET, reference_rows(rows, now))
        db.executemany(INSERT_DEAD_LETTER, dead_letter_rows(rows, now))
        db.execute("COMMIT")
        db.execute("ANALYZE")
    finally:
        db.close()


def fill_postgres(url: str, rows: int, now: float) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY deliveries ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in delivery_rows(rows, now):
                    copy.write_row(row)
            with cur.copy("COPY tickets (ticket_id, reference, at) FROM STDIN") as copy:
                for row in reference_rows(rows, now):
                    copy.write_row(row)
            cur.executemany(pg(INSERT_DEAD_LETTER), list(dead_letter_rows(rows, now)))
        conn.execute("VACUUM ANALYZE")


def statements() -> dict[str, tuple[str, list[Any]]]:
    """The audit's reads, with the SQL the ledger runs (`?` placeholders)."""
    return {
        "ticket": audit_sql(DeliveryQuery(ticket="t1")),
        "busy": audit_sql(DeliveryQuery(ticket="busy")),
        "reference": (
            "SELECT ticket_id FROM tickets WHERE reference=? ORDER BY ticket_id",
            ["T-1"],
        ),
        "dead_letters": (
            'SELECT topic, partition, "offset", stage, reason, ticket_id, event_id, at'
            " FROM dead_letters WHERE ticket_id=? ORDER BY at DESC",
            ["t100"],
        ),
    }


def explain(url: str, backend: str) -> dict[str, list[str]]:
    """The plan of each audit read, as the database reports it (PostgreSQL: with timings)."""
    plans: dict[str, list[str]] = {}
    if backend == "sqlite":
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            for name, (sql, params) in statements().items():
                rows = db.execute(f"EXPLAIN QUERY PLAN {sql}", params)
                plans[name] = [str(r[-1]) for r in rows]
        finally:
            db.close()
        return plans
    with psycopg.connect(url, autocommit=True) as conn:
        for name, (sql, params) in statements().items():
            cur = conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {pg(sql)}", params)
            plans[name] = [str(r[0]) for r in cur.fetchall()]
    return plans


async def timed(fn: Callable[[int], Awaitable[Any]], count: int) -> dict[str, float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        await fn(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": times[min(len(times) - 1, int(len(times) * 0.95))],
        "max_ms": times[-1],
        "count": count,
    }


async def measure(url: str, backend: str, rows: int, queries: int) -> dict[str, Any]:
    now = time.time()
    ledger: Ledger = create_ledger(url, LedgerConfig())
    await ledger.open()  # the schema, by the migrations
    try:
        started = time.perf_counter()
        if backend == "sqlite":
            await asyncio.to_thread(fill_sqlite, url.removeprefix("sqlite:///"), rows, now)
        else:
            await asyncio.to_thread(fill_postgres, url, rows, now)
        fill_s = time.perf_counter() - started
        rng = random.Random(7)
        tickets = tickets_for(rows)
        picks = [rng.randrange(tickets) for _ in range(queries)]
        found: list[int] = []

        async def by_ledger(i: int) -> None:
            found.append(len(await ledger.deliveries(DeliveryQuery(ticket=f"t{picks[i]}"))))

        app = create_audit_app(ledger, TOKEN, Metrics(CollectorRegistry()))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://audit",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as client:

            async def by_http(i: int) -> None:
                response = await client.get("/deliveries", params={"ticket": f"t{picks[i]}"})
                response.raise_for_status()

            async def by_reference(i: int) -> None:
                await find_tickets(ledger, f"T-{picks[i]}")

            async def busy(i: int) -> None:
                await ledger.deliveries(DeliveryQuery(ticket="busy"))

            await timed(by_ledger, min(20, queries))  # warm caches, as a running service has
            found.clear()
            results = {
                "ledger": await timed(by_ledger, queries),
                "http": await timed(by_http, queries),
                "page": await timed(by_reference, queries),
                "busy": await timed(busy, queries),
            }
        results["rows_per_ticket_found"] = statistics.mean(found) if found else 0
        results["fill_s"] = fill_s
        results["plans"] = await asyncio.to_thread(explain, url, backend)
        return results
    finally:
        await ledger.close()


async def run(rows: int, queries: int, backends: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"config": {"rows": rows, "queries": queries}}
    if "sqlite" in backends:
        with tempfile.TemporaryDirectory() as work:
            url = f"sqlite:///{Path(work) / 'ledger.sqlite3'}"
            results["sqlite"] = await measure(url, "sqlite", rows, queries)
    if "postgres" in backends:
        server = os.environ.get("NOTIFY_TEST_POSTGRES_URL")
        cluster = None
        if server is None:
            cluster = PostgresCluster()
            cluster.start()
            server = cluster.url()
        name = f"bench_{uuid.uuid4().hex[:8]}"
        try:
            url = create_database(server, name)
            results["postgres"] = await measure(url, "postgres", rows, queries)
            drop_database(server, name)
        finally:
            if cluster is not None:
                cluster.remove()
    return results


def report(results: dict[str, Any]) -> str:
    lines = [f"{results['config']['rows']:,} delivery rows, {results['config']['queries']} queries"]
    for backend in ("sqlite", "postgres"):
        if backend not in results:
            continue
        r = results[backend]
        lines.append(f"{backend}: filled in {r['fill_s']:.0f} s")
        for name in ("ledger", "http", "page", "busy"):
            t = r[name]
            ok = "ok" if t["p95_ms"] <= TARGET_MS else f"OVER {TARGET_MS:.0f} ms"
            lines.append(
                f"  {name:7} p50 {t['p50_ms']:7.2f} ms  p95 {t['p95_ms']:7.2f} ms"
                f"  max {t['max_ms']:7.2f} ms  {ok}"
            )
        for name, plan in r["plans"].items():
            lines.append(f"  plan of {name}:")
            lines.extend(f"    {line}" for line in plan)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), action="append")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.rows < BUSY_ROWS + ROWS_PER_TICKET:
        parser.error(f"--rows: at least {BUSY_ROWS + ROWS_PER_TICKET}")
    results = asyncio.run(run(args.rows, args.queries, args.backend or ["sqlite", "postgres"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
