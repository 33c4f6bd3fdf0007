"""The SQLite ledger: durable, keyed by (activity, kind, recipient), sent beats failed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.delivery.ledger import Entry, SqliteLedger


async def open_ledger(path: Path) -> SqliteLedger:
    ledger = SqliteLedger(path)
    await ledger.open()
    return ledger


async def test_records_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    ledger = await open_ledger(db)
    key = ("5001", "customer_content", "dana@customer.test")
    await ledger.record(Entry(key, "sent", "<a@x>"))
    await ledger.close()

    reopened = await open_ledger(db)
    other = ("5001", "staff", "dana@customer.test")
    assert await reopened.sent([key, other]) == {key}
    assert await reopened.status(key) == ("sent", "<a@x>")
    await reopened.close()


async def test_failed_is_not_sent_and_never_overwrites_sent(tmp_path: Path) -> None:
    ledger = await open_ledger(tmp_path / "l.db")
    failed = ("1", "supplier", "orders@acme.test")
    await ledger.record(Entry(failed, "failed", "<f@x>"))
    assert await ledger.sent([failed]) == set()
    await ledger.record(Entry(failed, "sent", "<f@x>"))
    assert await ledger.sent([failed]) == {failed}
    await ledger.record(Entry(failed, "failed", "<f@x>"))
    assert await ledger.status(failed) == ("sent", "<f@x>")
    await ledger.close()


async def test_concurrent_records_are_all_kept(tmp_path: Path) -> None:
    ledger = await open_ledger(tmp_path / "l.db")
    keys = [(str(i), "staff", f"u{i}@x.test") for i in range(500)]
    await asyncio.gather(*(ledger.record(Entry(k, "sent", f"<{k[0]}@x>")) for k in keys))
    assert await ledger.sent(keys) == set(keys)
    await ledger.close()


async def test_dead_letters_are_remembered(tmp_path: Path) -> None:
    ledger = await open_ledger(tmp_path / "l.db")
    assert await ledger.dead_lettered([("t", 0, 7)]) == set()
    await ledger.record_dead_letter(("t", 0, 7), "decode")
    await ledger.record_dead_letter(("t", 0, 7), "decode")
    assert await ledger.dead_lettered([("t", 0, 7), ("t", 1, 7)]) == {("t", 0, 7)}
    await ledger.close()


def test_url_forms(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "ledger.sqlite3"
    SqliteLedger.from_url(f"sqlite:///{target}")
    assert target.parent.is_dir()
    assert SqliteLedger.from_url("memory://")._path == ":memory:"
