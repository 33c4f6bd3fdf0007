"""The PostgreSQL ledger against a real server going away and coming back, and bad URLs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.postgres import PostgresCluster
from service.delivery.ledger import (
    ClaimRequest,
    Entry,
    Ledger,
    LedgerConfigError,
    LedgerUnavailable,
    Status,
    create_ledger,
    open_ledger,
    open_when_reachable,
)
from tests.ledger_support import key, opened

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).parent.parent / "examples"


async def recovered(ledger: Ledger, within: float = 30.0) -> float:
    """Seconds until a record goes through again; fails past `within`."""
    started = time.monotonic()
    while True:
        try:
            await ledger.record(Entry(key(int(started * 1000)), Status.SENT, "<r@x>"))
        except LedgerUnavailable:
            assert time.monotonic() - started < within, "the ledger did not recover"
            await asyncio.sleep(0.2)
        else:
            return time.monotonic() - started


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_a_database_outage_is_transient(postgres_cluster: PostgresCluster, how: str) -> None:
    url = postgres_cluster.create_database(f"outage_{how}")
    ledger = await opened(url, connect_timeout=2)
    try:
        await ledger.record(Entry(key(1), Status.SENT, "<1@x>"))
        if how == "kill":
            postgres_cluster.kill()
        else:
            postgres_cluster.stop()
        with pytest.raises(LedgerUnavailable):
            await ledger.record(Entry(key(2), Status.SENT, "<2@x>"))
        with pytest.raises(LedgerUnavailable):
            await ledger.claim([ClaimRequest(key(3))], "A", 30, 0)
        with pytest.raises(LedgerUnavailable):
            await ledger.sent([key(1)])
        assert await ledger.ping() is False
        postgres_cluster.start()
        await recovered(ledger)
        assert await ledger.ping() is True
        assert await ledger.sent([key(1), key(2)]) == {key(1)}
    finally:
        if not postgres_cluster.running:
            postgres_cluster.start()
        await ledger.close()


async def test_start_up_waits_for_the_database(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.create_database("late")
    postgres_cluster.stop()
    ledger = create_ledger(url)
    try:
        opening = asyncio.create_task(open_when_reachable(ledger, max_delay=0.5))
        await asyncio.sleep(1.5)
        assert not opening.done()
        postgres_cluster.start()
        await asyncio.wait_for(opening, 30)
        await ledger.record(Entry(key(1), Status.SENT, "<1@x>"))
    finally:
        if not postgres_cluster.running:
            postgres_cluster.start()
        await ledger.close()


async def test_a_wrong_password_is_one_line_without_it(postgres_url: str) -> None:
    wrong = postgres_url.replace(":notifier-test@", ":Wr0ngPassw0rd@")
    assert wrong != postgres_url
    with pytest.raises(LedgerConfigError) as caught:
        await open_ledger(wrong)
    message = str(caught.value)
    assert message.startswith("NOTIFY_LEDGER_URL: postgresql://postgres:***@127.0.0.1:")
    assert "password authentication failed" in message
    assert "\n" not in message
    assert "Wr0ngPassw0rd" not in message


async def test_a_missing_database_is_a_bad_setting(postgres_url: str) -> None:
    with pytest.raises(LedgerConfigError, match=r'database "nowhere" does not exist'):
        await open_ledger(postgres_url.rsplit("/", 1)[0] + "/nowhere")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:Sekr1t@host:port/db",
        "postgresql://u:Sekr1t@[::1/db",
        "postgres://u:Sekr1t@h/d?x=1",
    ],
)
async def test_a_malformed_url_is_one_line_without_the_password(url: str) -> None:
    with pytest.raises(LedgerConfigError) as caught:
        await open_ledger(url)
    assert str(caught.value).startswith("NOTIFY_LEDGER_URL: ")
    assert "Sekr1t" not in str(caught.value)


def notifier(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_run_and_db_upgrade_stop_with_one_line_on_a_wrong_password(postgres_url: str) -> None:
    env = {
        "NOTIFY_LEDGER_URL": postgres_url.replace(":notifier-test@", ":Wr0ngPassw0rd@"),
        "NOTIFY_ATTACHMENTS_DIR": str(EXAMPLES / "attachments"),
        "NOTIFY_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "NOTIFY_RENDER_WORKERS": "0",
    }
    for args in (("run",), ("db", "upgrade")):
        done = notifier(*args, env=env)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "NOTIFY_LEDGER_URL" in lines[0]
        assert "Wr0ngPassw0rd" not in done.stderr + done.stdout
