"""The durable record of what was sent, so nothing is sent twice."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

Key = tuple[str, str, str]
"""(activity id, kind, recipient address lower-cased)."""

Where = tuple[str, int, int]
"""(topic, partition, offset) of a Kafka record."""

Status = Literal["sent", "failed"]
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    activity_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL,
    message_id TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (activity_id, kind, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    stage TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One notification's final state."""

    key: Key
    status: Status
    message_id: str


class Ledger(Protocol):
    """What the dispatcher needs from a ledger; a shared database can implement it too."""

    async def sent(self, keys: Sequence[Key]) -> set[Key]:
        """The keys among `keys` already accepted by the SMTP server."""
        ...

    async def record(self, entry: Entry) -> None:
        """Durably record one notification's outcome before its offset is committed."""
        ...

    async def dead_lettered(self, records: Sequence[Where]) -> set[Where]:
        """The records among `records` already sent to the dead-letter topic."""
        ...

    async def record_dead_letter(self, record: Where, stage: str) -> None:
        """Remember that this record went to the dead-letter topic."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...


class SqliteLedger:
    """SQLite in WAL mode, used from one worker thread so the event loop never blocks.

    Concurrent `record` calls are coalesced into one transaction (group commit): the
    mail is already accepted by then, so the shorter the wait, the smaller the window
    in which a crash would re-send it.
    """

    def __init__(self, path: Path | str) -> None:
        self._path = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[Entry, asyncio.Future[None]]] = []
        self._flushing = False

    @classmethod
    def from_url(cls, url: str) -> SqliteLedger:
        """`sqlite:///relative/path`, `sqlite:////absolute/path` or `memory://`."""
        if url.startswith("memory://"):
            return cls(":memory:")
        path = url.removeprefix("sqlite:///")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(path)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (the case we guard against);
        # only an OS crash or power loss could drop the newest transactions.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("ledger is not open")
        return self._conn

    async def sent(self, keys: Sequence[Key]) -> set[Key]:
        if not keys:
            return set()
        return await self._run(self._sent, list(keys))

    def _sent(self, keys: list[Key]) -> set[Key]:
        found: set[Key] = set()
        db = self._db()
        for key in keys:
            row = db.execute(
                "SELECT 1 FROM notifications WHERE activity_id=? AND kind=? AND recipient=?"
                " AND status='sent'",
                key,
            ).fetchone()
            if row is not None:
                found.add(key)
        return found

    async def record(self, entry: Entry) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._run(self._write, [entry for entry, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._flushing = False

    def _write(self, entries: Iterable[Entry]) -> None:
        db = self._db()
        now = time.time()
        db.execute("BEGIN")
        try:
            db.executemany(
                # A later "sent" wins over an earlier "failed" (a replay that got through);
                # a "failed" never overwrites a "sent".
                "INSERT INTO notifications VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (activity_id, kind, recipient) DO UPDATE SET"
                " status=excluded.status, message_id=excluded.message_id,"
                " recorded_at=excluded.recorded_at WHERE notifications.status != 'sent'",
                [(*e.key, e.status, e.message_id, now) for e in entries],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def dead_lettered(self, records: Sequence[Where]) -> set[Where]:
        if not records:
            return set()
        return await self._run(self._dead_lettered, list(records))

    def _dead_lettered(self, records: list[Where]) -> set[Where]:
        db = self._db()
        return {
            where
            for where in records
            if db.execute(
                'SELECT 1 FROM dead_letters WHERE topic=? AND partition=? AND "offset"=?', where
            ).fetchone()
            is not None
        }

    async def record_dead_letter(self, record: Where, stage: str) -> None:
        await self._run(self._record_dead_letter, record, stage)

    def _record_dead_letter(self, record: Where, stage: str) -> None:
        self._db().execute(
            "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
            (*record, stage, time.time()),
        )

    async def status(self, key: Key) -> tuple[str, str] | None:
        """The recorded status and Message-ID of one notification (for tools and tests)."""
        return await self._run(self._status, key)

    def _status(self, key: Key) -> tuple[str, str] | None:
        row = (
            self._db()
            .execute(
                "SELECT status, message_id FROM notifications"
                " WHERE activity_id=? AND kind=? AND recipient=?",
                key,
            )
            .fetchone()
        )
        return None if row is None else (str(row[0]), str(row[1]))

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
