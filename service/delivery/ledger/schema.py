"""The ledger's tables as SQLAlchemy metadata: what the migrations build, and what `db copy` moves.

The service itself queries with plain SQL (sqlite3, psycopg); this metadata serves the
tools, and a test checks that the migrations produce exactly it on both backends.
Times are epoch seconds (REAL / double precision) everywhere, so queries read the same.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
Epoch: sa.Double[float] = sa.Double()

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("activity_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("recipient", sa.Text, nullable=False),
    sa.Column("moment", sa.Text, nullable=False, server_default=""),
    sa.Column("ticket_id", sa.Text),
    sa.Column("event_id", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("message_id", sa.Text),
    sa.Column("stage", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("owner", sa.Text),
    sa.Column("claimed_until", Epoch),
    # What a claim replaced, so that releasing it restores the row (a `throttled` mail
    # must stay releasable by a replay); NULL when the claim created the row.
    sa.Column("prior_status", sa.Text),
    sa.Column("prior_at", Epoch),
    sa.Column("created_at", Epoch, nullable=False),
    sa.Column("at", Epoch, nullable=False),
    sa.PrimaryKeyConstraint("activity_id", "kind", "recipient", "moment"),
    sa.Index("ix_deliveries_ticket_at", "ticket_id", "at"),
    # Status before time: the recipient limit's hourly count (contract section 10) reads
    # only the rows that take a slot (sent, claimed), not the `throttled` ones a flood to
    # one address leaves, which `(recipient, at)` walked on every claim. The audit's
    # look-ups by recipient alone sort that recipient's rows instead (see revision 0002).
    sa.Index("ix_deliveries_recipient_status_at", "recipient", "status", "at"),
    sa.Index("ix_deliveries_at", "at"),
    sqlite_with_rowid=False,
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("partition", sa.Integer, nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("ticket_id", sa.Text),
    sa.Column("event_id", sa.Text),
    sa.Column("stage", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("at", Epoch, nullable=False),
    sa.PrimaryKeyConstraint("topic", "partition", "offset"),
    sa.Index("ix_dead_letters_ticket_at", "ticket_id", "at"),
    sa.Index("ix_dead_letters_at", "at"),
    sqlite_with_rowid=False,
)

tickets = sa.Table(
    "tickets",
    metadata,
    sa.Column("ticket_id", sa.Text, primary_key=True),
    sa.Column("reference", sa.Text, nullable=False),
    sa.Column("at", Epoch, nullable=False),
    sa.Index("ix_tickets_reference", "reference"),
)

consumer_groups = sa.Table(
    "consumer_groups",
    metadata,
    sa.Column("group_id", sa.Text, primary_key=True),
    sa.Column("first_started_at", Epoch, nullable=False),
)

reminders = sa.Table(
    "reminders",
    metadata,
    sa.Column("activity_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("ticket_id", sa.Text),
    sa.Column("moment", Epoch, nullable=False),
    sa.Column("sequence", sa.Integer, nullable=False, server_default="0"),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("payload", sa.Text),
    sa.Column("version", Epoch, nullable=False, server_default="0"),
    sa.Column("owner", sa.Text),
    sa.Column("claimed_until", Epoch),
    sa.Column("updated_at", Epoch, nullable=False),
    sa.PrimaryKeyConstraint("activity_id", "kind"),
    sa.Index("ix_reminders_state_moment", "state", "moment"),
)

TABLES = (deliveries, dead_letters, tickets, consumer_groups, reminders)
