"""Ledger schema on both backends: migrations match the model, versions are checked, v1
files are upgraded in place, and `notifier db upgrade|copy` work."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.cli import main
from service.delivery.ledger import (
    Claim,
    ClaimRequest,
    DeliveryQuery,
    Entry,
    Key,
    LedgerSchemaError,
    Status,
    parse_ledger_url,
)
from service.delivery.ledger.claims import COUNTED
from service.delivery.ledger.migrate import alembic_config, head
from service.delivery.ledger.pgsql import RECENT as PG_RECENT
from service.delivery.ledger.schema import metadata
from service.delivery.ledger.sqlite import RECENT as SQLITE_RECENT
from tests.ledger_support import BACKENDS, backend_url, key, opened, run_sql


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


async def test_migrations_build_exactly_the_model(url: str) -> None:
    await (await opened(url)).close()
    engine = sa.create_engine(parse_ledger_url(url).sqlalchemy_url())
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert diff == []
    assert run_sql(url, "SELECT version_num FROM alembic_version") == [(head(),)]


RECIPIENT_INDEX = "ix_deliveries_recipient_status_at"


def index_names(url: str) -> set[str]:
    if url.startswith("sqlite:///"):
        sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deliveries'"
    else:
        sql = "SELECT indexname FROM pg_indexes WHERE tablename = 'deliveries'"
    return {str(row[0]) for row in run_sql(url, sql)}


async def test_a_ledger_at_revision_0001_gets_the_new_recipient_index_and_keeps_its_rows(
    url: str,
) -> None:
    engine = sa.create_engine(parse_ledger_url(url).sqlalchemy_url())
    try:
        with engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
    finally:
        engine.dispose()
    assert "ix_deliveries_recipient_at" in index_names(url)
    now = time.time()
    run_sql(
        url,
        "INSERT INTO deliveries (activity_id, kind, recipient, moment, status, message_id,"
        " created_at, at) VALUES ('1', 'staff', 'sam@helpdesk.test', '', 'sent', '<1@x>', ?, ?)",
        (now, now),
    )
    ledger = await opened(url)  # upgrades to head
    try:
        assert run_sql(url, "SELECT version_num FROM alembic_version") == [(head(),)]
        names = index_names(url)
        assert RECIPIENT_INDEX in names
        assert "ix_deliveries_recipient_at" not in names  # replaced, not kept beside it
        # The row from before the upgrade still takes its slot: a limit of 1 is reached.
        again = ClaimRequest(Key("2", "staff", "sam@helpdesk.test"), "t", "e")
        claims = await ledger.claim([again], "me", 60, 1)
        assert claims[again.key] is Claim.THROTTLED
    finally:
        await ledger.close()


async def test_the_hourly_count_seeks_only_the_counted_rows(url: str) -> None:
    """The recipient limit's count must not walk the recipient's other rows of the hour
    (under a flood, its `throttled` ones): the index is searched by status as well. With
    a flood's rows in the table, since PostgreSQL plans by its statistics."""
    await (await opened(url)).close()
    now = time.time()
    run_sql(
        url,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)"
        " INSERT INTO deliveries (activity_id, kind, recipient, moment, status, created_at, at)"
        " SELECT 'f' || i, 'customer_content', 'flood@customer.test', '',"
        " CASE WHEN i <= 10 THEN 'sent' ELSE 'throttled' END, ?, ? FROM n",
        (now, now),
    )
    run_sql(url, "ANALYZE deliveries")
    if url.startswith("sqlite:///"):
        args = ("flood@customer.test", *COUNTED, now - 3600)
        plan = str(run_sql(url, f"EXPLAIN QUERY PLAN {SQLITE_RECENT}", args))
        assert f"INDEX {RECIPIENT_INDEX} (recipient=? AND status=? AND at>?)" in plan
    else:
        args = (["flood@customer.test"], now)
        lines = run_sql(url, f"EXPLAIN ANALYZE {PG_RECENT.replace('%s', '?')}", args)
        plan = "\n".join(line[0] for line in lines)
        assert RECIPIENT_INDEX in plan
        condition = next(line for line in plan.splitlines() if "Index Cond" in line)
        assert "status" in condition, plan
        assert "at >" in condition, plan
        assert "rows=10 " in plan  # the index gave the 10 counted rows, not 3,000


async def test_a_schema_newer_than_the_code_is_refused(url: str) -> None:
    await (await opened(url)).close()
    run_sql(url, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(LedgerSchemaError, match=r"newer than this notifier") as caught:
        await opened(url)
    assert "\n" not in str(caught.value)


async def test_without_migration_a_schema_behind_is_refused(url: str) -> None:
    with pytest.raises(LedgerSchemaError, match=r"run `notifier db upgrade`"):
        await opened(url, migrate=False)
    await (await opened(url)).close()  # migrates
    await (await opened(url, migrate=False)).close()  # now current: opens


async def test_instances_starting_together_migrate_once(url: str) -> None:
    ledgers = await asyncio.gather(*(opened(url) for _ in range(3)))
    await ledgers[0].record(Entry(key(1), Status.SENT, "<1@x>"))
    assert await ledgers[2].sent([key(1)]) == {key(1)}
    for ledger in ledgers:
        await ledger.close()


async def test_sqlite_files_opened_together_all_switch_to_wal(tmp_path: Path) -> None:
    """Three instances opening one new file race to switch it to WAL; SQLite may refuse
    one at once ("database is locked"). Without the wait, about one round in six failed."""
    for i in range(40):
        ledgers = await asyncio.gather(
            *(opened(f"sqlite:///{tmp_path}/race{i}.sqlite3") for _ in range(3))
        )
        for ledger in ledgers:
            await ledger.close()
        conn = sqlite3.connect(tmp_path / f"race{i}.sqlite3")
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()


def make_v1(path: Path) -> None:
    """A ledger file as version 1 of the service wrote it."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE notifications (activity_id TEXT NOT NULL, kind TEXT NOT NULL,
            recipient TEXT NOT NULL, status TEXT NOT NULL, message_id TEXT NOT NULL,
            recorded_at REAL NOT NULL, PRIMARY KEY (activity_id, kind, recipient)) WITHOUT ROWID;
        CREATE TABLE dead_letters (topic TEXT NOT NULL, partition INTEGER NOT NULL,
            "offset" INTEGER NOT NULL, stage TEXT NOT NULL, recorded_at REAL NOT NULL,
            PRIMARY KEY (topic, partition, "offset")) WITHOUT ROWID;
        INSERT INTO notifications VALUES ('5001', 'customer_content', 'dana@customer.test',
            'sent', '<a@x>', 1000.0);
        INSERT INTO notifications VALUES ('5001', 'supplier', 'orders@acme.test',
            'failed', '<b@x>', 1001.0);
        INSERT INTO dead_letters VALUES ('ticket-activities', 2, 17, 'decode', 1002.0);
        """
    )
    conn.commit()
    conn.close()


async def test_a_v1_sqlite_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    make_v1(path)
    ledger = await opened(f"sqlite:///{path}")
    sent = Key("5001", "customer_content", "dana@customer.test")
    failed = Key("5001", "supplier", "orders@acme.test")
    assert await ledger.sent([sent, failed]) == {sent}
    rows = await ledger.deliveries(DeliveryQuery(activity="5001"))
    assert [(r.key, r.status, r.message_id, r.at) for r in rows] == [
        (failed, Status.FAILED, "<b@x>", 1001.0),
        (sent, Status.SENT, "<a@x>", 1000.0),
    ]
    assert await ledger.dead_lettered([("ticket-activities", 2, 17)]) == {
        ("ticket-activities", 2, 17)
    }
    await ledger.close()
    tables = {r[0] for r in run_sql(f"sqlite:///{path}", "SELECT name FROM sqlite_master")}
    assert "notifications" not in tables
    assert "dead_letters_v1" not in tables


@pytest.mark.parametrize(("setting", "pragma"), [("full", 2), ("normal", 1)])
async def test_sqlite_synchronous_setting(tmp_path: Path, setting: str, pragma: int) -> None:
    ledger = await opened(f"sqlite:///{tmp_path / 'l.db'}", sqlite_synchronous=setting)
    conn = ledger._conn  # type: ignore[attr-defined]
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == pragma
    await ledger.close()


def test_db_upgrade_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v1.sqlite3"
    make_v1(path)
    monkeypatch.setenv("NOTIFY_LEDGER_URL", f"sqlite:///{path}")
    assert main(["db", "upgrade"]) == 0
    assert f"schema revision {head()}" in capsys.readouterr().out
    assert run_sql(f"sqlite:///{path}", "SELECT count(*) FROM deliveries") == [(2,)]


@pytest.mark.integration
def test_db_copy_moves_a_sqlite_ledger_to_postgres(
    tmp_path: Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "v1.sqlite3"
    make_v1(source)
    monkeypatch.setenv("NOTIFY_LEDGER_URL", postgres_url)
    assert main(["db", "copy", "--from", f"sqlite:///{source}"]) == 0
    out = capsys.readouterr().out
    assert "deliveries 2, dead_letters 1" in out
    assert "notifier-test" not in out  # the target's password
    assert main(["db", "copy", "--from", f"sqlite:///{source}"]) == 0  # re-run: no clash
    rows = run_sql(postgres_url, "SELECT activity_id, kind, status, at FROM deliveries ORDER BY at")
    assert rows == [
        ("5001", "customer_content", "sent", 1000.0),
        ("5001", "supplier", "failed", 1001.0),
    ]
    assert run_sql(postgres_url, "SELECT stage FROM dead_letters") == [("decode",)]
    # The planner knows the copied tables at once, not after autovacuum's next look.
    analyzed = run_sql(
        postgres_url,
        "SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL",
    )
    assert {"deliveries", "dead_letters"} <= {row[0] for row in analyzed}
