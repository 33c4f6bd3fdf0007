"""Schema versions with Alembic, run from code: check, upgrade, refuse a schema newer than us."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.pool import NullPool, StaticPool

from service.delivery.ledger.errors import LedgerSchemaError
from service.delivery.ledger.url import LedgerUrl

log = logging.getLogger("service.delivery.ledger")

SCRIPTS = "service.delivery.ledger:migrations"
# One key for every instance's migration: whoever holds it upgrades, the others wait and
# then find the schema current. (Advisory locks are per database, so no other use clashes.)
MIGRATION_LOCK = 0x6E6F746966696572  # "notifier"
LEGACY = "v1"
"""What `current` says of a v1 SQLite file: tables, but no alembic_version."""


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPTS)
    return config


def head() -> str:
    """The newest revision this code knows."""
    found = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if found is None:  # pragma: no cover - the package always ships its revisions
        raise LedgerSchemaError("no ledger migrations found in the package")
    return found


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands against this code."""

    current: str | None
    """Its revision; None for an empty database, LEGACY for a v1 SQLite file."""
    head: str
    known: bool
    """Whether this code knows `current` (False: the database is newer than us)."""

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def inspect_schema(connection: sa.Connection) -> SchemaState:
    script = ScriptDirectory.from_config(alembic_config())
    newest = head()
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        legacy = sa.inspect(connection).has_table("notifications")
        return SchemaState(LEGACY if legacy else None, newest, known=True)
    try:
        known = script.get_revision(current) is not None
    except CommandError:
        known = False
    return SchemaState(current, newest, known)


def ensure_schema(connection: sa.Connection, *, migrate: bool) -> SchemaState:
    """Upgrade to head if allowed; LedgerSchemaError when newer, or behind with `migrate` off.

    Runs in one transaction on `connection`, under an advisory lock on PostgreSQL, so that
    instances starting together upgrade once.
    """
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        state = inspect_schema(connection)
        if state.up_to_date:
            return state
        if not state.known:
            raise LedgerSchemaError(
                f"the ledger's schema (revision {state.current}) is newer than this notifier"
                f" knows (revision {state.head}): upgrade the notifier, or point"
                " NOTIFY_LEDGER_URL at another ledger"
            )
        if not migrate:
            raise LedgerSchemaError(
                f"the ledger's schema ({state.current or 'empty'}) is behind this notifier"
                f" ({state.head}) and NOTIFY_LEDGER_MIGRATE is false:"
                " run `notifier db upgrade` first"
            )
        log.info(
            "upgrading the ledger schema",
            extra={"from_revision": state.current or "empty", "to_revision": state.head},
        )
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return SchemaState(state.head, state.head, known=True)


@contextmanager
def schema_engine(
    url: LedgerUrl, *, connect_timeout: float = 10.0, sqlite: Any = None
) -> Iterator[sa.Engine]:
    """An engine for migrations: on the ledger's own sqlite3 connection (`sqlite`), which
    an in-memory database needs, or a fresh `postgresql+psycopg` one."""
    if url.backend == "sqlite":
        engine = sa.create_engine("sqlite://", creator=_const(sqlite), poolclass=StaticPool)

        # pysqlite's own transaction handling skips DDL; the connection is in autocommit
        # mode (isolation_level=None), so SQLAlchemy's BEGIN must be ours: IMMEDIATE.
        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = sa.create_engine(
            url.sqlalchemy_url(),
            poolclass=NullPool,
            connect_args={"connect_timeout": max(1, round(connect_timeout))},
        )
    try:
        yield engine
    finally:
        engine.dispose(close=url.backend != "sqlite")


def _const(value: Any) -> Callable[[], Any]:
    if value is None:
        raise ValueError("a SQLite schema engine needs the ledger's connection")
    return lambda: value
