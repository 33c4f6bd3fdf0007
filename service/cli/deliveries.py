"""`notifier deliveries --ticket ID|REFERENCE [--json]`: one ticket's audit, from the ledger."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from service.delivery.ledger import (
    LedgerError,
    LedgerUnavailable,
    create_ledger,
    parse_ledger_url,
)
from service.runtime.audit.report import (
    TicketReport,
    dead_letter_json,
    delivery_json,
    find_tickets,
)
from service.runtime.parts import ledger_config
from service.runtime.settings import settings_or_exit

DELIVERY_COLUMNS = ("at", "status", "kind", "recipient", "activity", "message_id", "reason")
DEAD_LETTER_COLUMNS = ("at", "stage", "reason", "record", "event")


def cmd_deliveries(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    url = parse_ledger_url(settings.ledger_url.get_secret_value())
    if url.backend == "sqlite" and url.path != ":memory:" and not Path(url.path).is_file():
        # Opening would create an empty ledger: say where we looked instead.
        print(f"notifier deliveries: NOTIFY_LEDGER_URL: no ledger at {url.path}", file=sys.stderr)
        return 2

    async def read() -> list[TicketReport]:
        # Opened as `notifier run` opens it (NOTIFY_LEDGER_MIGRATE applies), then only read.
        ledger = create_ledger(url, ledger_config(settings))
        await ledger.open()
        try:
            return await find_tickets(ledger, args.ticket)
        finally:
            await ledger.close()

    try:
        tickets = asyncio.run(read())
    except LedgerUnavailable as exc:
        print(f"notifier deliveries: {exc}", file=sys.stderr)
        return 1
    except LedgerError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(as_json(tickets), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        write_tables(tickets, sys.stdout)
    if not tickets:
        print(
            f"notifier deliveries: nothing recorded for ticket id or reference {args.ticket!r}",
            file=sys.stderr,
        )
        return 1
    return 0


def as_json(tickets: Sequence[TicketReport]) -> dict[str, list[dict[str, Any]]]:
    """`GET /deliveries`'s document, with the tickets' dead letters beside it."""
    return {
        "deliveries": [delivery_json(d) for t in tickets for d in t.deliveries],
        "dead_letters": [dead_letter_json(letter) for t in tickets for letter in t.dead_letters],
    }


def printable(value: Any) -> str:
    """A cell: None as "-", control characters (terminal escapes) shown as \\xNN."""
    if value is None:
        return "-"
    text = str(value)
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    cells = [[printable(row.get(c)) for c in columns] for row in rows]
    header = [c.upper().replace("_", "-") for c in columns]
    widths = [max(len(x) for x in column) for column in zip(header, *cells, strict=False)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (header, *cells)
    ]


def write_tables(tickets: Sequence[TicketReport], out: TextIO) -> None:
    for i, ticket in enumerate(tickets):
        if i:
            out.write("\n")
        reference = f" ({printable(ticket.reference)})" if ticket.reference else ""
        out.write(f"Ticket {printable(ticket.ticket_id)}{reference}\n")
        rows = [delivery_json(d) for d in ticket.deliveries]
        if rows:
            out.write("\n".join(table(rows, DELIVERY_COLUMNS)) + "\n")
        else:
            out.write("no notifications recorded\n")
        letters = [dead_letter_json(letter) for letter in ticket.dead_letters]
        if letters:
            for letter in letters:
                letter["record"] = f"{letter['topic']}/{letter['partition']}/{letter['offset']}"
            out.write("\nDead letters\n")
            out.write("\n".join(table(letters, DEAD_LETTER_COLUMNS)) + "\n")


def add_deliveries_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser(
        "deliveries",
        help="what the ledger recorded for a ticket: every notification and dead letter",
    )
    cmd.add_argument(
        "--ticket", required=True, metavar="ID", help="a ticket id, or its reference (T-1042)"
    )
    cmd.add_argument("--json", action="store_true", help="JSON as GET /deliveries answers it")
    cmd.set_defaults(func=cmd_deliveries)
