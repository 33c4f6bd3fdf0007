"""The embedded ledger: one SQLite file (WAL) for a single instance, or memory:// for tests."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
)
from service.delivery.ledger.claims import COUNTED, WINDOW_SECONDS, Row, decide
from service.delivery.ledger.commit import GroupCommit
from service.delivery.ledger.errors import LedgerConfigError, LedgerUnavailable
from service.delivery.ledger.migrate import ensure_schema, schema_engine
from service.delivery.ledger.reminders import (
    FINISH_REMINDER,
    REMINDER_COLUMNS,
    UPSERT_REMINDER,
    finish_params,
    reminder_of,
    reminder_params,
)
from service.delivery.ledger.rows import (
    KEY_MATCH,
    PRUNE,
    Write,
    audit_sql,
    claim_params,
    dead_letter_reason,
    delivery_of,
    entry_params,
    newest_writes,
    row_of,
)
from service.delivery.ledger.tickets import Ticket, TicketCache
from service.delivery.ledger.url import SETTING, LedgerUrl

T = TypeVar("T")

UPSERT_ENTRY = (
    "INSERT INTO deliveries (activity_id, kind, recipient, moment, ticket_id, event_id, status,"
    " message_id, stage, reason, created_at, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (activity_id, kind, recipient, moment) DO UPDATE SET"
    " ticket_id=coalesce(excluded.ticket_id, deliveries.ticket_id),"
    " event_id=coalesce(excluded.event_id, deliveries.event_id), status=excluded.status,"
    " message_id=coalesce(excluded.message_id, deliveries.message_id), stage=excluded.stage,"
    " reason=excluded.reason, at=excluded.at, owner=NULL, claimed_until=NULL,"
    " prior_status=NULL, prior_at=NULL"
    # A later "sent" wins over any earlier outcome; nothing ever overwrites a "sent".
    " WHERE deliveries.status <> 'sent'"
)
UPSERT_CLAIM = (
    "INSERT INTO deliveries (activity_id, kind, recipient, moment, ticket_id, event_id, status,"
    " owner, claimed_until, prior_status, prior_at, created_at, at)"
    " VALUES (?, ?, ?, ?, ?, ?, 'claimed', ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (activity_id, kind, recipient, moment) DO UPDATE SET status='claimed',"
    " ticket_id=coalesce(excluded.ticket_id, deliveries.ticket_id),"
    " event_id=coalesce(excluded.event_id, deliveries.event_id), owner=excluded.owner,"
    " claimed_until=excluded.claimed_until, prior_status=excluded.prior_status,"
    " prior_at=excluded.prior_at, at=excluded.at"
)
UPSERT_TICKET = (
    "INSERT INTO tickets (ticket_id, reference, at) VALUES (?, ?, ?)"
    " ON CONFLICT (ticket_id) DO UPDATE SET reference=excluded.reference, at=excluded.at"
)
ROW = (
    "SELECT status, owner, claimed_until, at, prior_status, prior_at FROM deliveries WHERE "
    + KEY_MATCH
)
RECENT = "SELECT count(*) FROM deliveries WHERE recipient=? AND status IN (?, ?) AND at > ?"


class SqliteLedger:
    """SQLite in WAL mode, used from one worker thread so the event loop never blocks.

    One instance only: claims are atomic within this process's file, not across hosts.
    """

    shared = False

    def __init__(self, url: LedgerUrl | Path | str, config: LedgerConfig | None = None) -> None:
        self._url = url if isinstance(url, LedgerUrl) else LedgerUrl("sqlite", path=str(url))
        self._config = config or LedgerConfig()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._conn: sqlite3.Connection | None = None
        self._commits: GroupCommit[Write] = GroupCommit(self._write)
        self._tickets = TicketCache()

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        path = self._url.path
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            _wal(conn)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerConfigError(f"{SETTING}: cannot open {path}: {exc}") from None
        # FULL syncs the WAL on every commit, so an OS crash or power cut loses no
        # recorded send; NORMAL (opt-in) syncs at checkpoints only and may lose the newest.
        conn.execute(f"PRAGMA synchronous={self._config.sqlite_synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            with schema_engine(self._url, sqlite=conn) as engine, engine.connect() as c:
                ensure_schema(c, migrate=self._config.migrate)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            # Locked by another process, disk full, I/O error: may pass; rewind and retry.
            raise LedgerUnavailable(f"sqlite: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("ledger is not open")
        return self._conn

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def ping(self) -> bool:
        try:
            await self._run(lambda: self._db().execute("SELECT 1").fetchone())
        except Exception:
            return False
        return True

    async def sent(self, keys: Sequence[Key]) -> set[Key]:
        if not keys:
            return set()
        return await self._run(self._sent, list(keys))

    def _sent(self, keys: list[Key]) -> set[Key]:
        db = self._db()
        return {
            key
            for key in keys
            if db.execute(
                "SELECT 1 FROM deliveries WHERE status='sent' AND " + KEY_MATCH, key
            ).fetchone()
        }

    async def sent_mails(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, str]]:
        if not pairs:
            return {}
        return await self._run(self._sent_mails, list(pairs))

    def _sent_mails(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
        db = self._db()
        sql = (
            "SELECT kind, message_id FROM deliveries WHERE activity_id=? AND recipient=?"
            " AND moment='' AND status='sent'"
        )
        found: dict[tuple[str, str], dict[str, str]] = {}
        for pair in pairs:
            for kind, message_id in db.execute(sql, pair):
                if message_id:
                    found.setdefault(pair, {})[str(kind)] = str(message_id)
        return found

    async def look_up(self, query: BatchQuery) -> BatchFacts:
        def read() -> BatchFacts:
            return BatchFacts(
                self._dead_lettered(list(query.records)),
                self._reminders_of(query.activities),
                self._sent(list(query.keys)),
                self._sent_mails(list(query.pairs)),
            )

        return await self._run(read)

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
        stored = [reminder_params(r, time.time()) for r in reminders]

        def claim(db: sqlite3.Connection) -> dict[Key, Claim]:
            claims = (
                self._claim(db, list(requests), owner, lease_seconds, limit_per_hour)
                if requests
                else {}
            )
            db.executemany(UPSERT_REMINDER, stored)
            return claims

        return await self._run(self._transaction, claim)

    def _claim(
        self,
        db: sqlite3.Connection,
        requests: list[ClaimRequest],
        owner: str,
        lease: float,
        limit: int,
    ) -> dict[Key, Claim]:
        now = time.time()
        rows: dict[Key, Row] = {}
        for request in requests:
            found = db.execute(ROW, request.key).fetchone()
            if found is not None:
                rows[request.key] = row_of(found)
        recent: dict[str, int] = {}
        if limit > 0:
            for recipient in {r.key.recipient for r in requests}:
                args = (recipient, *COUNTED, now - WINDOW_SECONDS)
                recent[recipient] = db.execute(RECENT, args).fetchone()[0]
        outcomes, grants = decide(
            requests, rows, recent, owner=owner, now=now, limit_per_hour=limit
        )
        db.executemany(UPSERT_CLAIM, [claim_params(g, owner, now, lease) for g in grants])
        return outcomes

    async def release(self, keys: Sequence[Key], owner: str) -> None:
        if keys:
            await self._run(self._transaction, lambda db: self._release(db, list(keys), owner))

    def _release(self, db: sqlite3.Connection, keys: list[Key], owner: str) -> None:
        mine = f"status='claimed' AND owner=? AND {KEY_MATCH}"
        for key in keys:
            # A claim that created its row leaves nothing; one that replaced an outcome
            # puts it back (a released `throttled` stays releasable by a replay).
            db.execute(
                f"DELETE FROM deliveries WHERE prior_status IS NULL AND {mine}", (owner, *key)
            )
            db.execute(
                "UPDATE deliveries SET status=prior_status, at=prior_at, owner=NULL,"
                f" claimed_until=NULL, prior_status=NULL, prior_at=NULL WHERE {mine}",
                (owner, *key),
            )

    async def record(self, entry: Entry) -> None:
        await self._commits.submit(entry)

    async def record_ticket(self, ticket_id: str, reference: str) -> None:
        if self._tickets.known(ticket_id, reference):
            return
        await self._commits.submit(Ticket(ticket_id, reference))
        self._tickets.remember(ticket_id, reference)

    async def _write(self, items: Sequence[Write]) -> None:
        await self._run(self._transaction, lambda db: self._write_now(db, items))

    def _write_now(self, db: sqlite3.Connection, items: Sequence[Write]) -> None:
        now = time.time()
        entries, tickets = newest_writes(items)
        db.executemany(UPSERT_ENTRY, [entry_params(e, now) for e in entries])
        db.executemany(UPSERT_TICKET, [(t.ticket_id, t.reference, now) for t in tickets])

    async def dead_lettered(self, records: Sequence[Where]) -> set[Where]:
        if not records:
            return set()
        return await self._run(self._dead_lettered, list(records))

    def _dead_lettered(self, records: list[Where]) -> set[Where]:
        db = self._db()
        sql = 'SELECT 1 FROM dead_letters WHERE topic=? AND partition=? AND "offset"=?'
        return {where for where in records if db.execute(sql, where).fetchone()}

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        params = (*letter.where, letter.ticket_id, letter.event_id, letter.stage)
        await self._run(
            lambda: self._db().execute(
                'INSERT OR IGNORE INTO dead_letters (topic, partition, "offset", ticket_id,'
                " event_id, stage, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*params, dead_letter_reason(letter), time.time()),
            )
        )

    async def tickets_by_reference(self, reference: str) -> list[str]:
        sql = "SELECT ticket_id FROM tickets WHERE reference=? ORDER BY ticket_id"
        rows = await self._run(lambda: self._db().execute(sql, (reference,)).fetchall())
        return [str(r[0]) for r in rows]

    async def deliveries(self, query: DeliveryQuery) -> list[Delivery]:
        sql, params = audit_sql(query)
        rows = await self._run(lambda: self._db().execute(sql, params).fetchall())
        return [delivery_of(r) for r in rows]

    async def dead_letters_of(self, ticket_id: str) -> list[DeadLetter]:
        sql = (
            'SELECT topic, partition, "offset", stage, reason, ticket_id, event_id, at'
            " FROM dead_letters WHERE ticket_id=? ORDER BY at DESC"
        )
        rows = await self._run(lambda: self._db().execute(sql, (ticket_id,)).fetchall())
        return [DeadLetter((r[0], r[1], r[2]), *r[3:]) for r in rows]

    async def first_start(self, group_id: str, now: float) -> float:
        def first(db: sqlite3.Connection) -> float:
            db.execute(
                "INSERT OR IGNORE INTO consumer_groups (group_id, first_started_at) VALUES (?, ?)",
                (group_id, now),
            )
            sql = "SELECT first_started_at FROM consumer_groups WHERE group_id=?"
            return float(db.execute(sql, (group_id,)).fetchone()[0])

        return await self._run(self._transaction, first)

    async def prune(self, older_than: float, batch_size: int = 500) -> int:
        total = 0
        for sql in PRUNE:
            while True:
                done = await self._run(
                    self._transaction,
                    lambda db, sql=sql: db.execute(sql, (older_than, batch_size)).rowcount,
                )
                total += done
                if done < batch_size:
                    break
        return total

    async def reminders_of(self, activity_ids: Sequence[str]) -> list[ReminderRow]:
        if not activity_ids:
            return []
        return await self._run(self._reminders_of, activity_ids)

    def _reminders_of(self, activity_ids: Sequence[str]) -> list[ReminderRow]:
        sql = f"SELECT {REMINDER_COLUMNS} FROM reminders WHERE activity_id=?"
        db = self._db()
        return [reminder_of(r) for a in activity_ids for r in db.execute(sql, (a,))]

    async def store_reminders(self, rows: Sequence[ReminderRow]) -> None:
        if not rows:
            return
        now = time.time()
        params = [reminder_params(r, now) for r in rows]
        await self._run(self._transaction, lambda db: db.executemany(UPSERT_REMINDER, params))

    async def next_reminder_due(self) -> float | None:
        sql = "SELECT min(moment) FROM reminders WHERE state='scheduled'"
        row = await self._run(lambda: self._db().execute(sql).fetchone())
        return None if row is None or row[0] is None else float(row[0])

    async def take_due_reminders(
        self, owner: str, lease_seconds: float, limit: int
    ) -> list[ReminderRow]:
        def take(db: sqlite3.Connection) -> list[ReminderRow]:
            now = time.time()
            due = [
                reminder_of(r)
                for r in db.execute(
                    f"SELECT {REMINDER_COLUMNS} FROM reminders WHERE state='scheduled'"
                    " AND moment <= ? AND (claimed_until IS NULL OR claimed_until < ?)"
                    " ORDER BY moment LIMIT ?",
                    (now, now, limit),
                )
            ]
            db.executemany(
                "UPDATE reminders SET owner=?, claimed_until=? WHERE activity_id=? AND kind=?",
                [(owner, now + lease_seconds, r.activity_id, r.kind) for r in due],
            )
            return due

        return await self._run(self._transaction, take)

    async def finish_reminder(self, row: ReminderRow, state: str) -> bool:
        def finish(db: sqlite3.Connection) -> bool:
            done = db.execute(FINISH_REMINDER, finish_params(row, state, time.time()))
            return done.rowcount > 0

        return await self._run(self._transaction, finish)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)


def _wal(conn: sqlite3.Connection, patience: float = 5.0) -> None:
    """Switch to WAL, waiting while another instance opening the same file holds it.

    Instances that start together on one new file race to switch it: SQLite may answer
    "database is locked" at once, without waiting in its busy handler (the fault showed
    up as a start-up error in tests/test_ledger_schema.py; three ledgers opened at once on
    a new file 300 times, 50 of the 900 opens failed without this, none with it).
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
