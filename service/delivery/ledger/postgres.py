"""The shared ledger: PostgreSQL through psycopg 3 (async) and a psycopg_pool connection pool.

Every instance of a consumer group uses the same database, so claims, limits and group
facts hold across instances. Claims on one recipient are serialised by a transaction-
scoped advisory lock per recipient, taken in sorted order so two claims never deadlock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg_pool import AsyncConnectionPool

from service.delivery.ledger import (
    BatchFacts,
    BatchQuery,
    Claim,
    ClaimRequest,
    DeadLetter,
    Delivery,
    DeliveryQuery,
    Entry,
    Key,
    LedgerConfig,
    ReminderRow,
    Where,
    one_line,
)
from service.delivery.ledger.claims import decide
from service.delivery.ledger.commit import GroupCommit
from service.delivery.ledger.errors import LedgerError, LedgerUnavailable
from service.delivery.ledger.migrate import ensure_schema, schema_engine
from service.delivery.ledger.pgsql import (
    CLAIM,
    DEAD_LETTERED,
    KEY_ROWS,
    NOW,
    RECENT,
    RELEASE,
    SENT,
    SENT_MAILS,
    UPSERT_ENTRIES,
    UPSERT_TICKETS,
    classify,
    columns,
    pg,
)
from service.delivery.ledger.reminders import (
    FINISH_REMINDER,
    REMINDER_COLUMNS,
    UPSERT_REMINDER,
    finish_params,
    reminder_of,
    reminder_params,
)
from service.delivery.ledger.rows import (
    PRUNE,
    Write,
    audit_sql,
    claim_params,
    delivery_of,
    entry_params,
    newest_writes,
    row_of,
)
from service.delivery.ledger.tickets import Ticket, TicketCache
from service.delivery.ledger.url import LedgerUrl

log = logging.getLogger("service.delivery.ledger")

PING_TIMEOUT_SECONDS = 3.0


def lock_key(recipient: str) -> int:
    """A signed 64-bit advisory lock key for one recipient."""
    return int.from_bytes(
        hashlib.blake2b(recipient.encode(), digest_size=8).digest(), "big", signed=True
    )


class PostgresLedger:
    """The ledger on PostgreSQL; concurrent `record` calls share one transaction."""

    shared = True

    def __init__(self, url: LedgerUrl, config: LedgerConfig | None = None) -> None:
        self._url = url
        self._config = config or LedgerConfig()
        self._pool: AsyncConnectionPool | None = None
        self._commits: GroupCommit[Write] = GroupCommit(self._write)
        self._tickets = TicketCache()
        self._checking: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect once to tell a bad setting from an outage, migrate, then start the pool."""
        conninfo = self._url.conninfo()
        timeout = max(1, round(self._config.connect_timeout))
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=timeout)
            await conn.close()
            await asyncio.to_thread(self._ensure_schema)
        except psycopg.Error as exc:
            raise classify(exc, self._url) from None
        pool: AsyncConnectionPool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=self._config.pool_size,
            open=False,
            timeout=self._config.connect_timeout,
            kwargs={"connect_timeout": timeout, "application_name": "ticket-notifier"},
            name="ledger",
        )
        await pool.open(wait=False)
        self._pool = pool

    def _ensure_schema(self) -> None:
        timeout = self._config.connect_timeout
        try:
            with schema_engine(self._url, connect_timeout=timeout) as engine, engine.connect() as c:
                ensure_schema(c, migrate=self._config.migrate)
        except sa.exc.DBAPIError as exc:
            if isinstance(exc.orig, psycopg.Error):
                raise exc.orig from None
            raise

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection in a transaction (committed on leaving the block)."""
        if self._pool is None:
            raise RuntimeError("ledger is not open")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            # Broken connections may sit idle in the pool after a database restart:
            # check them all now rather than fail once per connection.
            if self._checking is None or self._checking.done():
                self._checking = asyncio.create_task(self._pool.check())
            raise LedgerUnavailable(f"postgresql: {one_line(str(exc))}") from exc

    async def ping(self) -> bool:
        if self._pool is None:
            return False
        try:
            async with self._pool.connection(timeout=PING_TIMEOUT_SECONDS) as conn:
                await conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    async def sent(self, keys: Sequence[Key]) -> set[Key]:
        return (await self.look_up(BatchQuery(keys=keys))).sent

    @staticmethod
    async def _sent(conn: psycopg.AsyncConnection[Any], keys: Sequence[Key]) -> set[Key]:
        if not keys:
            return set()
        wanted = {tuple(k): k for k in keys}
        cur = await conn.execute(SENT, columns(keys, 4))
        return {wanted[tuple(r)] for r in await cur.fetchall() if tuple(r) in wanted}

    async def sent_mails(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, str]]:
        return (await self.look_up(BatchQuery(pairs=pairs))).sent_mails

    @staticmethod
    async def _sent_mails(
        conn: psycopg.AsyncConnection[Any], pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, str]]:
        found: dict[tuple[str, str], dict[str, str]] = {}
        if not pairs:
            return found
        cur = await conn.execute(SENT_MAILS, columns(pairs, 2))
        for activity, recipient, kind, message_id in await cur.fetchall():
            if message_id:
                found.setdefault((str(activity), str(recipient)), {})[str(kind)] = str(message_id)
        return found

    async def look_up(self, query: BatchQuery) -> BatchFacts:
        # `sent`, `sent_mails`, `dead_lettered` and `reminders_of` are this with one part:
        # each part's helper skips its query when the part is empty, and no connection is
        # taken for nothing.
        if not (query.records or query.activities or query.keys or query.pairs):
            return BatchFacts(set(), [], set(), {})
        async with self._connection() as conn:
            return BatchFacts(
                await self._dead_lettered(conn, query.records),
                await self._reminders_of(conn, query.activities),
                await self._sent(conn, query.keys),
                await self._sent_mails(conn, query.pairs),
            )

    async def claim(
        self,
        requests: Sequence[ClaimRequest],
        owner: str,
        lease_seconds: float,
        limit_per_hour: int,
        reminders: Sequence[ReminderRow] = (),
    ) -> dict[Key, Claim]:
        if not requests and not reminders:
            return {}
        if not requests:
            await self.store_reminders(reminders)
            return {}
        keys = [r.key for r in requests]
        recipients = sorted({k.recipient for k in keys})
        locks = sorted({lock_key(r) for r in recipients})
        async with self._connection() as conn:
            # Sorted keys: two claims over the same recipients lock in the same order.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::int8[]) AS k", [locks]
            )
            now_row = await (await conn.execute(f"SELECT {NOW}")).fetchone()
            now = float(now_row[0]) if now_row else 0.0
            found = await (await conn.execute(KEY_ROWS, columns(keys, 4))).fetchall()
            rows = {Key(*r[:4]): row_of(r[4:]) for r in found}
            recent: dict[str, int] = {}
            if limit_per_hour > 0:
                counted = await conn.execute(RECENT, [recipients, now])
                recent = {r[0]: int(r[1]) for r in await counted.fetchall()}
            outcomes, grants = decide(
                requests, rows, recent, owner=owner, now=now, limit_per_hour=limit_per_hour
            )
            if grants:
                params = [claim_params(g, owner, now, lease_seconds) for g in grants]
                await conn.execute(CLAIM, columns(params, 12))
            if reminders:
                await self._store_reminders(conn, reminders)
        return outcomes

    async def release(self, keys: Sequence[Key], owner: str) -> None:
        if not keys:
            return
        async with self._connection() as conn:
            for sql in RELEASE:
                await conn.execute(sql, [*columns(keys, 4), owner])

    async def record(self, entry: Entry) -> None:
        await self._commits.submit(entry)

    async def record_ticket(self, ticket_id: str, reference: str) -> None:
        if self._tickets.known(ticket_id, reference):
            return
        await self._commits.submit(Ticket(ticket_id, reference))
        self._tickets.remember(ticket_id, reference)

    async def _write(self, items: Sequence[Write]) -> None:
        entries, tickets = newest_writes(items)
        async with self._connection() as conn:
            if entries:
                # The time is the database's: every instance stamps rows with one clock.
                params = [entry_params(e, 0.0)[:10] for e in entries]
                await conn.execute(UPSERT_ENTRIES, columns(params, 10))
            if tickets:
                pairs = [(t.ticket_id, t.reference) for t in tickets]
                await conn.execute(UPSERT_TICKETS, columns(pairs, 2))

    async def dead_lettered(self, records: Sequence[Where]) -> set[Where]:
        return (await self.look_up(BatchQuery(records=records))).dead_lettered

    @staticmethod
    async def _dead_lettered(
        conn: psycopg.AsyncConnection[Any], records: Sequence[Where]
    ) -> set[Where]:
        if not records:
            return set()
        cur = await conn.execute(DEAD_LETTERED, columns(records, 3))
        return {(str(t), int(p), int(o)) for t, p, o in await cur.fetchall()}

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        async with self._connection() as conn:
            await conn.execute(
                'INSERT INTO dead_letters (topic, partition, "offset", ticket_id, event_id,'
                f" stage, reason, at) VALUES (%s, %s, %s, %s, %s, %s, %s, {NOW})"
                " ON CONFLICT DO NOTHING",
                (
                    *letter.where,
                    letter.ticket_id,
                    letter.event_id,
                    letter.stage,
                    one_line(letter.reason),
                ),
            )

    async def tickets_by_reference(self, reference: str) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT ticket_id FROM tickets WHERE reference=%s ORDER BY ticket_id", (reference,)
            )
            return [str(r[0]) for r in await cur.fetchall()]

    async def deliveries(self, query: DeliveryQuery) -> list[Delivery]:
        sql, params = audit_sql(query)
        async with self._connection() as conn:
            cur = await conn.execute(pg(sql), params)
            return [delivery_of(r) for r in await cur.fetchall()]

    async def dead_letters_of(self, ticket_id: str) -> list[DeadLetter]:
        async with self._connection() as conn:
            cur = await conn.execute(
                'SELECT topic, partition, "offset", stage, reason, ticket_id, event_id, at'
                " FROM dead_letters WHERE ticket_id=%s ORDER BY at DESC",
                (ticket_id,),
            )
            return [DeadLetter((r[0], r[1], r[2]), *r[3:]) for r in await cur.fetchall()]

    async def first_start(self, group_id: str, now: float) -> float:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO consumer_groups (group_id, first_started_at) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                (group_id, now),
            )
            cur = await conn.execute(
                "SELECT first_started_at FROM consumer_groups WHERE group_id=%s", (group_id,)
            )
            row = await cur.fetchone()
        if row is None:  # pragma: no cover - inserted just above
            raise LedgerError(f"consumer group {group_id!r} vanished from the ledger")
        return float(row[0])

    async def prune(self, older_than: float, batch_size: int = 500) -> int:
        total = 0
        for sql in PRUNE:
            while True:
                async with self._connection() as conn:
                    cur = await conn.execute(pg(sql), (older_than, batch_size))
                    done = cur.rowcount
                total += done
                if done < batch_size:
                    break
        return total

    async def reminders_of(self, activity_ids: Sequence[str]) -> list[ReminderRow]:
        return (await self.look_up(BatchQuery(activities=activity_ids))).reminders

    @staticmethod
    async def _reminders_of(
        conn: psycopg.AsyncConnection[Any], activity_ids: Sequence[str]
    ) -> list[ReminderRow]:
        if not activity_ids:
            return []
        cur = await conn.execute(
            f"SELECT {REMINDER_COLUMNS} FROM reminders WHERE activity_id = ANY(%s::text[])",
            [list(activity_ids)],
        )
        return [reminder_of(r) for r in await cur.fetchall()]

    async def store_reminders(self, rows: Sequence[ReminderRow]) -> None:
        if not rows:
            return
        async with self._connection() as conn:
            await self._store_reminders(conn, rows)

    @staticmethod
    async def _store_reminders(
        conn: psycopg.AsyncConnection[Any], rows: Sequence[ReminderRow]
    ) -> None:
        now_row = await (await conn.execute(f"SELECT {NOW}")).fetchone()
        now = float(now_row[0]) if now_row else time.time()
        async with conn.cursor() as cur:
            await cur.executemany(pg(UPSERT_REMINDER), [reminder_params(r, now) for r in rows])

    async def next_reminder_due(self) -> float | None:
        async with self._connection() as conn:
            cur = await conn.execute("SELECT min(moment) FROM reminders WHERE state='scheduled'")
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def take_due_reminders(
        self, owner: str, lease_seconds: float, limit: int
    ) -> list[ReminderRow]:
        async with self._connection() as conn:
            # SKIP LOCKED: instances polling at once each take different rows, none waits.
            cur = await conn.execute(
                f"UPDATE reminders r SET owner = %s, claimed_until = {NOW} + %s FROM ("
                "SELECT activity_id, kind FROM reminders WHERE state = 'scheduled'"
                f" AND moment <= {NOW} AND (claimed_until IS NULL OR claimed_until < {NOW})"
                " ORDER BY moment LIMIT %s FOR UPDATE SKIP LOCKED) AS due"
                " WHERE r.activity_id = due.activity_id AND r.kind = due.kind"
                f" RETURNING {', '.join('r.' + c.strip() for c in REMINDER_COLUMNS.split(','))}",
                (owner, lease_seconds, limit),
            )
            return sorted((reminder_of(r) for r in await cur.fetchall()), key=lambda r: r.moment)

    async def finish_reminder(self, row: ReminderRow, state: str) -> bool:
        async with self._connection() as conn:
            now_row = await (await conn.execute(f"SELECT {NOW}")).fetchone()
            now = float(now_row[0]) if now_row else time.time()
            cur = await conn.execute(pg(FINISH_REMINDER), finish_params(row, state, now))
            return cur.rowcount > 0

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
