"""Copy every table of one ledger into another (SQLite to PostgreSQL when scaling out)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from service.delivery.ledger.errors import LedgerConfigError, LedgerError
from service.delivery.ledger.migrate import ensure_schema, schema_engine
from service.delivery.ledger.schema import TABLES
from service.delivery.ledger.url import LedgerUrl

CHUNK = 1000


@contextmanager
def _blame(url: LedgerUrl) -> Iterator[None]:
    """Database errors as LedgerError naming this ledger (redacted)."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        import psycopg

        from service.delivery.ledger.pgsql import classify

        if isinstance(exc.orig, psycopg.Error):
            raise classify(exc.orig, url) from None
        raise LedgerError(f"{url}: {type(exc.orig).__name__}: {exc.orig}") from None


@contextmanager
def _connect(url: LedgerUrl) -> Iterator[sa.Connection]:
    """A connection to a ledger upgraded to this code's schema."""
    raw = None
    if url.backend == "sqlite":
        if url.path == ":memory:":
            raise LedgerConfigError("memory:// holds nothing to copy and keeps nothing copied")
        raw = sqlite3.connect(url.path, isolation_level=None, check_same_thread=False)
    try:
        with _blame(url), schema_engine(url, sqlite=raw) as engine, engine.connect() as conn:
            ensure_schema(conn, migrate=True)
            yield conn
    finally:
        if raw is not None:
            raw.close()


def copy_ledger(source: LedgerUrl, target: LedgerUrl) -> dict[str, int]:
    """Rows copied per table. Both ledgers are first upgraded to this code's schema; rows
    the target already has (same key) are kept as they are, so a copy can be re-run."""
    with _connect(source) as src, _connect(target) as dst:
        copied = {table.name: _copy_table(table, src, dst) for table in TABLES}
        if dst.dialect.name == "postgresql":
            # Statistics for the filled tables now, not when autovacuum next looks: until
            # then the planner takes them for nearly empty, and a claim's key look-up read
            # a whole 100,000-row table (104 ms) instead of its index.
            for table in TABLES:
                dst.exec_driver_sql(f"ANALYZE {table.name}")
            dst.commit()
        return copied


def _copy_table(table: sa.Table, src: sa.Connection, dst: sa.Connection) -> int:
    insert = pg_insert if dst.dialect.name == "postgresql" else sqlite_insert
    copied = 0
    with dst.begin():
        rows = src.execution_options(yield_per=CHUNK).execute(sa.select(table))
        for chunk in rows.partitions(CHUNK):
            batch = [dict(row._mapping) for row in chunk]
            dst.execute(insert(table).on_conflict_do_nothing(), batch)
            copied += len(batch)
    src.rollback()
    return copied
