"""PostgreSQL statements of the ledger (whole batches through unnest) and error triage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.delivery.ledger import one_line
from service.delivery.ledger.claims import WINDOW_SECONDS
from service.delivery.ledger.errors import LedgerConfigError, LedgerError, LedgerUnavailable
from service.delivery.ledger.url import SETTING, LedgerUrl

NOW = "extract(epoch FROM clock_timestamp())::float8"
"""The database's clock, in epoch seconds: one clock for every instance."""

_KEYS = "unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS k(a, b, c, m)"
_ON_KEY = "d.activity_id = k.a AND d.kind = k.b AND d.recipient = k.c AND d.moment = k.m"

SENT = (
    f"SELECT d.activity_id, d.kind, d.recipient, d.moment FROM deliveries d JOIN {_KEYS}"
    f" ON {_ON_KEY} WHERE d.status = 'sent'"
)
SENT_MAILS = (
    "SELECT d.activity_id, d.recipient, d.kind, d.message_id FROM deliveries d"
    " JOIN unnest(%s::text[], %s::text[]) AS k(a, c) ON d.activity_id = k.a"
    " AND d.recipient = k.c WHERE d.moment = '' AND d.status = 'sent'"
)
KEY_ROWS = (
    "SELECT d.activity_id, d.kind, d.recipient, d.moment, d.status, d.owner, d.claimed_until,"
    f" d.at, d.prior_status, d.prior_at FROM deliveries d JOIN {_KEYS} ON {_ON_KEY}"
)
RECENT = (
    "SELECT recipient, count(*) FROM deliveries WHERE recipient = ANY(%s::text[])"
    f" AND status IN ('sent', 'claimed') AND at > %s - {WINDOW_SECONDS}"
    " GROUP BY recipient"
)
CLAIM = (
    "INSERT INTO deliveries (activity_id, kind, recipient, moment, ticket_id, event_id, status,"
    " owner, claimed_until, prior_status, prior_at, created_at, at)"
    " SELECT a, b, c, m, t, e, 'claimed', o, u, ps, pa, ca, n FROM unnest("
    "%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::float8[], %s::text[], %s::float8[], %s::float8[], %s::float8[])"
    " AS x(a, b, c, m, t, e, o, u, ps, pa, ca, n)"
    " ON CONFLICT (activity_id, kind, recipient, moment) DO UPDATE SET status = 'claimed',"
    " ticket_id = coalesce(EXCLUDED.ticket_id, deliveries.ticket_id),"
    " event_id = coalesce(EXCLUDED.event_id, deliveries.event_id), owner = EXCLUDED.owner,"
    " claimed_until = EXCLUDED.claimed_until, prior_status = EXCLUDED.prior_status,"
    " prior_at = EXCLUDED.prior_at, at = EXCLUDED.at"
)
RELEASE = (
    # A claim that created its row leaves nothing; one that replaced an outcome puts it
    # back (a released `throttled` stays releasable by a replay).
    f"DELETE FROM deliveries d USING {_KEYS} WHERE {_ON_KEY}"
    " AND d.status = 'claimed' AND d.owner = %s AND d.prior_status IS NULL",
    "UPDATE deliveries d SET status = d.prior_status, at = d.prior_at, owner = NULL,"
    " claimed_until = NULL, prior_status = NULL, prior_at = NULL"
    f" FROM {_KEYS} WHERE {_ON_KEY} AND d.status = 'claimed' AND d.owner = %s",
)
UPSERT_ENTRIES = (
    "INSERT INTO deliveries (activity_id, kind, recipient, moment, ticket_id, event_id, status,"
    " message_id, stage, reason, created_at, at)"
    " SELECT x.*, n.t, n.t FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
    f" AS x(a, b, c, m, t, e, s, mi, st, re) CROSS JOIN (SELECT {NOW} AS t) AS n"
    " ON CONFLICT (activity_id, kind, recipient, moment) DO UPDATE SET"
    " ticket_id = coalesce(EXCLUDED.ticket_id, deliveries.ticket_id),"
    " event_id = coalesce(EXCLUDED.event_id, deliveries.event_id), status = EXCLUDED.status,"
    " message_id = coalesce(EXCLUDED.message_id, deliveries.message_id),"
    " stage = EXCLUDED.stage, reason = EXCLUDED.reason, at = EXCLUDED.at, owner = NULL,"
    " claimed_until = NULL, prior_status = NULL, prior_at = NULL"
    # A later "sent" wins over any earlier outcome; nothing ever overwrites a "sent".
    " WHERE deliveries.status <> 'sent'"
)
UPSERT_TICKETS = (
    "INSERT INTO tickets (ticket_id, reference, at) SELECT i, r, n.t"
    f" FROM unnest(%s::text[], %s::text[]) AS x(i, r) CROSS JOIN (SELECT {NOW} AS t) AS n"
    " ON CONFLICT (ticket_id) DO UPDATE SET reference = EXCLUDED.reference, at = EXCLUDED.at"
)
DEAD_LETTERED = (
    'SELECT d.topic, d.partition, d."offset" FROM dead_letters d'
    " JOIN unnest(%s::text[], %s::int4[], %s::int8[]) AS k(t, p, o)"
    ' ON d.topic = k.t AND d.partition = k.p AND d."offset" = k.o'
)


def pg(sql: str) -> str:
    """A statement written with sqlite3's `?` placeholders, for psycopg."""
    return sql.replace("?", "%s")


def columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows turned into `width` column lists, one array parameter each for unnest."""
    return [[row[i] for row in rows] for i in range(width)]


# Answers that will not change by waiting: the setting itself is wrong.
_PERMANENT = (
    "password",
    "authentication",
    "does not exist",
    "no pg_hba.conf entry",
    "invalid",
    "permission denied",
)


def classify(exc: Exception, url: LedgerUrl) -> LedgerError:
    """A connection error as LedgerConfigError (stop) or LedgerUnavailable (wait and retry).

    libpq never echoes the password; the URL is shown redacted.
    """
    first = str(exc).strip().split("\n", 1)[0]
    detail = first.rpartition("failed: ")[2] or first
    detail = one_line(detail.removeprefix("FATAL:").strip()) or type(exc).__name__
    if any(marker in detail for marker in _PERMANENT):
        return LedgerConfigError(f"{SETTING}: {url.redacted}: {detail}")
    return LedgerUnavailable(f"ledger unreachable: {url.redacted}: {detail}")
