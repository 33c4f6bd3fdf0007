"""`notifier deliveries` on real SQLite and PostgreSQL ledgers: the table, the JSON the API
answers, references, and the errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.delivery.ledger import Entry, Key, Status
from tests.audit_support import AUTH, REFERENCE, ROWS, TICKET, audit_app, client, fill
from tests.ledger_support import BACKENDS, backend_url, opened

ROOT = Path(__file__).resolve().parent.parent


def notifier(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    env["NOTIFY_LEDGER_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=BACKENDS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = backend_url(request, tmp_path)
    ledger = await opened(url)
    try:
        await fill(ledger, url)
        # A token with a terminal escape in it: printed as text, never as a control sequence.
        await ledger.record(
            Entry(Key("5009", "staff", "evil\x1b[2Jtoken"), Status.UNRESOLVED, ticket_id="77")
        )
    finally:
        await ledger.close()
    return url


async def test_the_json_is_what_the_api_answers(url: str) -> None:
    done = notifier("deliveries", "--ticket", TICKET, "--json", url=url)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    ledger = await opened(url)
    try:
        app, _ = audit_app(ledger)
        async with client(app) as http:
            api = await http.get("/deliveries", params={"ticket": TICKET}, headers=AUTH)
            letters = await http.get("/dead-letters", params={"ticket": TICKET}, headers=AUTH)
    finally:
        await ledger.close()
    assert printed == {**api.json(), **letters.json()}
    assert len(printed["deliveries"]) == len(ROWS)
    assert len(printed["dead_letters"]) == 1


async def test_a_reference_finds_the_ticket(url: str) -> None:
    by_id = notifier("deliveries", "--ticket", TICKET, "--json", url=url)
    by_reference = notifier("deliveries", "--ticket", REFERENCE, "--json", url=url)
    assert by_reference.returncode == 0, by_reference.stderr
    assert json.loads(by_reference.stdout) == json.loads(by_id.stdout)


async def test_the_table_lists_every_row_newest_first_and_the_dead_letters(url: str) -> None:
    done = notifier("deliveries", "--ticket", REFERENCE, url=url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Ticket 1042 (T-1042)"
    assert lines[1].split() == [
        "AT", "STATUS", "KIND", "RECIPIENT", "ACTIVITY", "MESSAGE-ID", "REASON"
    ]  # fmt: skip
    rows = lines[2 : 2 + len(ROWS)]
    assert [line.split()[1:4] for line in rows] == [
        [r.status.value, r.kind, r.recipient] for r in reversed(ROWS)
    ]
    assert rows[0].split()[0] == "2026-11-18T11:11:40Z"
    assert "smtp: 550 5.1.1 mailbox unknown" in rows[1]
    assert "<a.5007.cc@helpdesk.test>" in rows[0]
    dead = lines[lines.index("Dead letters") :]
    assert dead[1].split() == ["AT", "STAGE", "REASON", "RECORD", "EVENT"]
    assert "ticket-activities/1/41" in dead[2]
    assert "template error in staff.html" in dead[2]


async def test_control_characters_are_printed_escaped(url: str) -> None:
    done = notifier("deliveries", "--ticket", "77", url=url)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "evil\\x1b[2Jtoken" in done.stdout


async def test_nothing_recorded_is_exit_1(url: str) -> None:
    done = notifier("deliveries", "--ticket", "T-404", url=url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "notifier deliveries: nothing recorded for ticket id or reference 'T-404'\n"
    )
    as_json = notifier("deliveries", "--ticket", "T-404", "--json", url=url)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"deliveries": [], "dead_letters": []}


def test_a_missing_sqlite_ledger_is_named_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "ledger.sqlite3"
    done = notifier("deliveries", "--ticket", TICKET, url=f"sqlite:///{path}")
    assert done.returncode == 2
    assert done.stderr == f"notifier deliveries: NOTIFY_LEDGER_URL: no ledger at {path}\n"
    assert not path.parent.exists()


def test_a_bad_ledger_url_is_one_line_without_the_password() -> None:
    done = notifier("deliveries", "--ticket", TICKET, url="mysql://u:hunter2@db/x")
    assert done.returncode == 2
    assert done.stderr.startswith("notifier: bad setting: NOTIFY_LEDGER_URL: ")
    assert len(done.stderr.splitlines()) == 1
    assert "hunter2" not in done.stderr


def test_the_ticket_is_required() -> None:
    done = notifier("deliveries", url="memory://")
    assert done.returncode == 2
    assert "--ticket" in done.stderr
