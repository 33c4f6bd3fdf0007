"""Ledger test helpers: a URL per backend, opening with a config, raw SQL for set-ups."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from service.delivery.ledger import Key, Ledger, LedgerConfig, create_ledger

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.integration),
]


def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger URL for the backend the test is parametrized with."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def opened(url: str, **config: Any) -> Ledger:
    ledger = create_ledger(url, LedgerConfig(**config))
    await ledger.open()
    return ledger


def run_sql(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement on the ledger's database, outside the ledger (`?` placeholders)."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as pg:
        cur = pg.execute(sql.replace("?", "%s"), params)
        return cur.fetchall() if cur.description else []


def key(i: int, recipient: str = "dana@customer.test", kind: str = "customer_content") -> Key:
    return Key(str(i), kind, recipient)
