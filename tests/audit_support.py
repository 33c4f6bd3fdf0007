"""Audit test helpers: a ticket's worth of real ledger rows, and a client of the audit app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from service.delivery.ledger import DeadLetter, Entry, Key, Ledger, Status
from service.runtime.audit.api import create_audit_app
from service.runtime.metrics import Metrics
from tests.ledger_support import run_sql

TOKEN = "audit-test-token-7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
T0 = 1_795_000_000.0
"""2026-11-18T11:06:40Z: rows get times from here on, a minute apart."""


class Row(NamedTuple):
    """One notification of ticket 1042 as the dispatcher records it."""

    activity: str
    kind: str
    recipient: str
    status: Status
    message_id: str | None = None
    stage: str | None = None
    reason: str | None = None


TICKET = "1042"
REFERENCE = "T-1042"
UNKNOWN = "activityDepartments: not in the directory"
# Oldest first, so the audit answers them in reverse.
ROWS = [
    Row("5001", "customer_content", "dana@customer.test", Status.SENT, "<a.5001.cc@helpdesk.test>"),
    Row("5001", "staff", "alice@helpdesk.test", Status.SENT, "<a.5001.st.1@helpdesk.test>"),
    Row("5001", "staff", "no-such-department", Status.UNRESOLVED, reason=UNKNOWN),
    Row("5006", "supplier", "service@druckhaus.test", Status.WITHHELD, reason="personal data"),
    Row(
        "5006",
        "staff",
        "bob@helpdesk.test",
        Status.FAILED,
        None,
        "smtp",
        "550 5.1.1 mailbox unknown",
    ),
    Row("5007", "customer_content", "dana@customer.test", Status.SENT, "<a.5007.cc@helpdesk.test>"),
]


async def fill(ledger: Ledger, url: str) -> None:
    """Ticket 1042's rows through the ledger's own writes, then their times set apart
    (the ledger stamps its clock; the audit's order and `since` need distinct times)."""
    for i, (activity, kind, recipient, status, message_id, stage, reason) in enumerate(ROWS):
        await ledger.record(
            Entry(
                Key(activity, kind, recipient),
                status,
                message_id,
                ticket_id=TICKET,
                event_id=f"event-{i}",
                stage=stage,
                reason=reason,
            )
        )
        set_time(url, Key(activity, kind, recipient), T0 + 60 * i)
    # Another ticket, so that a filter that matched everything would show.
    await ledger.record(
        Entry(Key("7001", "staff", "alice@helpdesk.test"), Status.SENT, "<a.7001@x>", "2000", "e")
    )
    set_time(url, Key("7001", "staff", "alice@helpdesk.test"), T0 + 30)
    await ledger.record_ticket(TICKET, REFERENCE)
    await ledger.record_ticket("2000", "T-2000")
    await ledger.record_dead_letter(
        DeadLetter(
            ("ticket-activities", 1, 41), "render", "template error in staff.html", TICKET, "e-9"
        )
    )
    run_sql(url, "UPDATE dead_letters SET at=?", (T0 + 330,))


def set_time(url: str, key: Key, at: float) -> None:
    run_sql(
        url,
        "UPDATE deliveries SET at=?, created_at=? WHERE activity_id=? AND kind=? AND recipient=?"
        " AND moment=?",
        (at, at, *key),
    )


def newest_first(rows: Sequence[tuple[Any, ...]]) -> list[tuple[str, str, str]]:
    return [(r[0], r[1], r[2]) for r in reversed(rows)]


def audit_app(ledger: Ledger, token: str = TOKEN) -> tuple[Any, CollectorRegistry]:
    registry = CollectorRegistry()
    return create_audit_app(ledger, token, Metrics(registry)), registry


def client(app: Any, base_url: str = "http://audit.test") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """One sample's value from the registry's text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0
