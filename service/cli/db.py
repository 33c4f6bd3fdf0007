"""`notifier db upgrade|copy`, and the ledger check `notifier run` makes before it starts."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from service.delivery.ledger import (
    LedgerConfigError,
    LedgerError,
    LedgerUnavailable,
    create_ledger,
    open_when_reachable,
    parse_ledger_url,
)
from service.runtime.parts import ledger_config
from service.runtime.settings import Settings, settings_or_exit


def check_ledger(settings: Settings) -> int:
    """Before `notifier run`: open the ledger once (waiting while it is unreachable), so a
    bad URL, password or schema stops start-up with one line; 0 when it is usable."""

    async def check() -> None:
        ledger = create_ledger(settings.ledger_url.get_secret_value(), ledger_config(settings))
        await open_when_reachable(ledger)
        await ledger.close()

    try:
        asyncio.run(check())
    except LedgerError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Bring the ledger NOTIFY_LEDGER_URL names to this code's schema."""
    from service.delivery.ledger.migrate import head

    settings = settings_or_exit()
    url = parse_ledger_url(settings.ledger_url.get_secret_value())

    async def upgrade() -> None:
        ledger = create_ledger(url, dataclasses.replace(ledger_config(settings), migrate=True))
        await ledger.open()
        await ledger.close()

    try:
        asyncio.run(upgrade())
    except LedgerUnavailable as exc:
        print(f"notifier db upgrade: {exc}", file=sys.stderr)
        return 1
    except LedgerError as exc:
        print(f"notifier db upgrade: {exc}", file=sys.stderr)
        return 2
    print(f"ledger {url} is at schema revision {head()}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    """Copy every row of the ledger at --from into the one NOTIFY_LEDGER_URL names."""
    from service.delivery.ledger.copy import copy_ledger

    settings = settings_or_exit()
    try:
        source = parse_ledger_url(args.source)
    except LedgerConfigError as exc:
        print(
            f"notifier db copy: --from: {exc}".replace("NOTIFY_LEDGER_URL: ", ""), file=sys.stderr
        )
        return 2
    target = parse_ledger_url(settings.ledger_url.get_secret_value())
    if source == target:
        print("notifier db copy: --from names the ledger NOTIFY_LEDGER_URL names", file=sys.stderr)
        return 2
    try:
        counts = copy_ledger(source, target)
    except LedgerError as exc:
        print(f"notifier db copy: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, LedgerUnavailable) else 2
    summary = ", ".join(f"{table} {n}" for table, n in counts.items())
    print(f"copied from {source} to {target}: {summary}")
    return 0


def add_db_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="ledger schema and data tools")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="migrate the ledger at NOTIFY_LEDGER_URL to this code")
    up.set_defaults(func=cmd_upgrade)
    cp = db_sub.add_parser(
        "copy", help="copy every table of another ledger into the one at NOTIFY_LEDGER_URL"
    )
    cp.add_argument("--from", dest="source", required=True, metavar="SOURCE_URL")
    cp.set_defaults(func=cmd_copy)
