"""The ledger: every notification's claim and outcome, dead letters and group facts, durably.

`Ledger` is what the service needs from it; `SqliteLedger` (one instance, embedded) and
`PostgresLedger` (shared by every instance of a consumer group) implement it, and
`create_ledger` picks one from NOTIFY_LEDGER_URL. Rows hold ids, addresses, statuses and
one-line reasons; never activity or comment texts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

from service.core.backoff import backoff_delay
from service.core.routing import Key
from service.core.text import one_line as _one_line
from service.delivery.ledger.errors import (
    LedgerConfigError,
    LedgerError,
    LedgerSchemaError,
    LedgerUnavailable,
)
from service.delivery.ledger.url import LedgerUrl, parse_ledger_url

# Alembic narrates every step at INFO, from import on; the ledger logs what matters itself.
logging.getLogger("alembic").setLevel(logging.WARNING)


Where = tuple[str, int, int]
"""(topic, partition, offset) of a Kafka record."""


class Status(StrEnum):
    """A notification's state in the ledger; every one but CLAIMED is an outcome."""

    CLAIMED = "claimed"
    SENT = "sent"
    FAILED = "failed"
    WITHHELD = "withheld"
    UNRESOLVED = "unresolved"
    EXPIRED = "expired"
    THROTTLED = "throttled"


class Claim(StrEnum):
    """What `Ledger.claim` answers for one key."""

    WON = "won"
    """This owner holds the key until its lease ends: send, then record."""
    SENT = "sent"
    """Already sent (by anyone): skip it."""
    HELD = "held"
    """Another owner's lease has not ended: try again later."""
    THROTTLED = "throttled"
    """The recipient had its hourly limit of mails: record it as throttled."""


REASON_MAX = 200


def one_line(reason: str | None) -> str | None:
    """A reason as stored: one line (core.text.one_line) of at most REASON_MAX chars."""
    return None if reason is None else _one_line(reason, REASON_MAX)


@dataclass(frozen=True, slots=True)
class Entry:
    """One outcome of one notification, for `Ledger.record`."""

    key: Key
    status: Status
    message_id: str | None = None
    ticket_id: str | None = None
    event_id: str | None = None
    stage: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """A key to claim before sending, with the ids its row should carry."""

    key: Key
    ticket_id: str | None = None
    event_id: str | None = None
    bypass_limit: bool = False
    """A mail released by a DLQ replay: not throttled again if its row says `throttled`."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record sent to the dead-letter topic; `at` is set by the ledger when it is read."""

    where: Where
    stage: str
    reason: str | None = None
    ticket_id: str | None = None
    event_id: str | None = None
    at: float | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One row of the audit: a notification's newest state."""

    key: Key
    status: Status
    ticket_id: str | None
    event_id: str | None
    message_id: str | None
    stage: str | None
    reason: str | None
    created_at: float
    at: float


@dataclass(frozen=True, slots=True)
class DeliveryQuery:
    """Filters of `Ledger.deliveries`; unset ones match everything. Times are epoch seconds."""

    ticket: str | None = None
    activity: str | None = None
    recipient: str | None = None
    status: Status | None = None
    since: float | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class ReminderRow:
    """One activity's reminder of one kind, as stored (times in epoch seconds).

    `payload` is the newest event (its JSON text) while the reminder is scheduled: the
    reminder's mail is rendered from it when the moment comes; it is cleared afterwards.
    """

    activity_id: str
    kind: str
    ticket_id: str | None
    moment: float
    sequence: int
    state: str
    version: float
    payload: str | None = None


@dataclass(frozen=True, slots=True)
class BatchQuery:
    """What a batch asks the ledger before it is served, in one look (`Ledger.look_up`)."""

    records: Sequence[Where] = ()
    """Records to check against the dead letters."""
    activities: Sequence[str] = ()
    """Activities whose stored reminders are wanted."""
    keys: Sequence[Key] = ()
    """Notifications to check for a mail already sent."""
    pairs: Sequence[tuple[str, str]] = ()
    """(parent activity, recipient): the Message-IDs of the mails sent for them."""


@dataclass(frozen=True, slots=True)
class BatchFacts:
    """The ledger's answers to a BatchQuery."""

    dead_lettered: set[Where]
    reminders: list[ReminderRow]
    sent: set[Key]
    sent_mails: dict[tuple[str, str], dict[str, str]]


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """How to open a ledger (from the NOTIFY_LEDGER_* settings)."""

    migrate: bool = True
    """Upgrade the schema on open; otherwise a schema behind the code refuses to open."""
    sqlite_synchronous: Literal["full", "normal"] = "full"
    pool_size: int = 10
    connect_timeout: float = 10.0
    """Seconds to wait for a connection (PostgreSQL) before LedgerUnavailable."""


class Ledger(Protocol):
    """What the service needs from a ledger, on any backend."""

    @property
    def shared(self) -> bool:
        """True when several instances can share it (PostgreSQL), False for SQLite."""
        ...

    async def open(self) -> None:
        """Connect and check (or upgrade) the schema; LedgerUnavailable if it is unreachable."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """Whether the database answers now (for /readyz)."""
        ...

    async def sent(self, keys: Sequence[Key]) -> set[Key]:
        """The keys among `keys` whose mail was accepted by the SMTP server."""
        ...

    async def sent_mails(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, str]]:
        """For (activity id, recipient) pairs: the Message-ID of each kind of mail sent."""
        ...

    async def look_up(self, query: BatchQuery) -> BatchFacts:
        """`dead_lettered`, `reminders_of`, `sent` and `sent_mails` in one go."""
        ...

    async def claim(
        self,
        requests: Sequence[ClaimRequest],
        owner: str,
        lease_seconds: float,
        limit_per_hour: int,
        reminders: Sequence[ReminderRow] = (),
    ) -> dict[Key, Claim]:
        """Claim keys before sending them, in one transaction; see README "Ledger" for the rules.

        `reminders` are stored (as `store_reminders` does) in the same transaction.
        """
        ...

    async def release(self, keys: Sequence[Key], owner: str) -> None:
        """Drop this owner's claims on `keys` that did not lead to a send."""
        ...

    async def record(self, entry: Entry) -> None:
        """Durably record an outcome (group-committed); `sent` is never overwritten."""
        ...

    async def dead_lettered(self, records: Sequence[Where]) -> set[Where]:
        """The records among `records` already sent to the dead-letter topic."""
        ...

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        """Remember that a record went to the dead-letter topic (first one wins)."""
        ...

    async def record_ticket(self, ticket_id: str, reference: str) -> None:
        """Remember a ticket's reference so the audit can find it (cached, group-committed)."""
        ...

    async def tickets_by_reference(self, reference: str) -> list[str]:
        """Ticket ids recorded with this reference."""
        ...

    async def deliveries(self, query: DeliveryQuery) -> list[Delivery]:
        """Rows matching `query`, newest first, at most `query.limit`."""
        ...

    async def dead_letters_of(self, ticket_id: str) -> list[DeadLetter]:
        """Dead letters of one ticket (by record key), newest first."""
        ...

    async def first_start(self, group_id: str, now: float) -> float:
        """The moment this group first started on this ledger, stored as `now` if unknown."""
        ...

    async def prune(self, older_than: float, batch_size: int = 500) -> int:
        """Delete deliveries, dead letters and finished reminders older than `older_than`
        in transactions of at most `batch_size` rows each; the number deleted."""
        ...

    async def reminders_of(self, activity_ids: Sequence[str]) -> list[ReminderRow]:
        """The stored reminders of these activities."""
        ...

    async def store_reminders(self, rows: Sequence[ReminderRow]) -> None:
        """Write these reminders (insert or replace), in one transaction, durably."""
        ...

    async def next_reminder_due(self) -> float | None:
        """The earliest moment of a scheduled reminder, if any."""
        ...

    async def take_due_reminders(
        self, owner: str, lease_seconds: float, limit: int
    ) -> list[ReminderRow]:
        """Scheduled reminders whose moment has come and that nobody holds, now held by
        `owner` for `lease_seconds`: each is taken by one instance only (PostgreSQL:
        FOR UPDATE SKIP LOCKED), and taken again by anyone once its lease ends."""
        ...

    async def finish_reminder(self, row: ReminderRow, state: str) -> bool:
        """Mark a taken reminder sent (or failed), unless an event moved or cancelled it
        meanwhile; its payload goes. Whether it was still the reminder taken."""
        ...


def create_ledger(url: str | LedgerUrl, config: LedgerConfig | None = None) -> Ledger:
    """The ledger NOTIFY_LEDGER_URL names, not yet opened; LedgerConfigError if malformed."""
    parsed = url if isinstance(url, LedgerUrl) else parse_ledger_url(url)
    config = config or LedgerConfig()
    if parsed.backend == "postgres":
        from service.delivery.ledger.postgres import PostgresLedger

        return PostgresLedger(parsed, config)
    from service.delivery.ledger.sqlite import SqliteLedger

    return SqliteLedger(parsed, config)


async def open_ledger(url: str | LedgerUrl, config: LedgerConfig | None = None) -> Ledger:
    """`create_ledger` then `open`: connected, schema checked or upgraded."""
    ledger = create_ledger(url, config)
    await ledger.open()
    return ledger


async def open_when_reachable(ledger: Ledger, *, max_delay: float = 30.0) -> None:
    """Open the ledger, waiting out outages (start-up before the database is up).

    LedgerUnavailable is logged and retried with capped, jittered backoff; a bad setting
    or schema (LedgerConfigError, LedgerSchemaError) is raised at once.
    """
    log = logging.getLogger("service.delivery.ledger")
    attempt = 0
    while True:
        try:
            await ledger.open()
        except LedgerUnavailable as exc:
            log.warning("ledger unreachable at start-up, retrying", extra={"error": str(exc)})
            await asyncio.sleep(backoff_delay(attempt, 0.5, max_delay))
            attempt += 1
        else:
            return


__all__ = [
    "BatchFacts",
    "BatchQuery",
    "Claim",
    "ClaimRequest",
    "DeadLetter",
    "Delivery",
    "DeliveryQuery",
    "Entry",
    "Key",
    "Ledger",
    "LedgerConfig",
    "LedgerConfigError",
    "LedgerError",
    "LedgerSchemaError",
    "LedgerUnavailable",
    "LedgerUrl",
    "ReminderRow",
    "Status",
    "Where",
    "create_ledger",
    "one_line",
    "open_ledger",
    "open_when_reachable",
    "parse_ledger_url",
]
