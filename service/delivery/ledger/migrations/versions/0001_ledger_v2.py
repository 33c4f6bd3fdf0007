"""Ledger v2: deliveries with claims and audit fields, dead letters, tickets, groups, reminders.

A SQLite file from v1 (tables `notifications` and `dead_letters`, no alembic_version) is
upgraded in place: its rows move into the new tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Frozen here on purpose: a migration describes the schema of its day, not today's.
EPOCH: sa.Double[float] = sa.Double()


def upgrade() -> None:
    bind = op.get_bind()
    legacy = sa.inspect(bind).has_table("notifications")
    if legacy:
        op.rename_table("dead_letters", "dead_letters_v1")

    op.create_table(
        "deliveries",
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
        sa.Column("claimed_until", EPOCH),
        sa.Column("prior_status", sa.Text),
        sa.Column("prior_at", EPOCH),
        sa.Column("created_at", EPOCH, nullable=False),
        sa.Column("at", EPOCH, nullable=False),
        sa.PrimaryKeyConstraint("activity_id", "kind", "recipient", "moment"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_deliveries_ticket_at", "deliveries", ["ticket_id", "at"])
    op.create_index("ix_deliveries_recipient_at", "deliveries", ["recipient", "at"])
    op.create_index("ix_deliveries_at", "deliveries", ["at"])

    op.create_table(
        "dead_letters",
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("ticket_id", sa.Text),
        sa.Column("event_id", sa.Text),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("at", EPOCH, nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", "offset"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_dead_letters_ticket_at", "dead_letters", ["ticket_id", "at"])
    op.create_index("ix_dead_letters_at", "dead_letters", ["at"])

    op.create_table(
        "tickets",
        sa.Column("ticket_id", sa.Text, primary_key=True),
        sa.Column("reference", sa.Text, nullable=False),
        sa.Column("at", EPOCH, nullable=False),
    )
    op.create_index("ix_tickets_reference", "tickets", ["reference"])

    op.create_table(
        "consumer_groups",
        sa.Column("group_id", sa.Text, primary_key=True),
        sa.Column("first_started_at", EPOCH, nullable=False),
    )

    op.create_table(
        "reminders",
        sa.Column("activity_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("ticket_id", sa.Text),
        sa.Column("moment", EPOCH, nullable=False),
        sa.Column("sequence", sa.Integer, nullable=False, server_default="0"),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("payload", sa.Text),
        sa.Column("version", EPOCH, nullable=False, server_default="0"),
        sa.Column("owner", sa.Text),
        sa.Column("claimed_until", EPOCH),
        sa.Column("updated_at", EPOCH, nullable=False),
        sa.PrimaryKeyConstraint("activity_id", "kind"),
    )
    op.create_index("ix_reminders_state_moment", "reminders", ["state", "moment"])

    if legacy:
        # v1 knew neither tickets nor events: those columns stay NULL for the old rows.
        op.execute(
            "INSERT INTO deliveries (activity_id, kind, recipient, moment, status, message_id,"
            " created_at, at)"
            " SELECT activity_id, kind, recipient, '', status, message_id, recorded_at,"
            " recorded_at FROM notifications"
        )
        op.execute(
            'INSERT INTO dead_letters (topic, partition, "offset", stage, at)'
            ' SELECT topic, partition, "offset", stage, recorded_at FROM dead_letters_v1'
        )
        op.drop_table("notifications")
        op.drop_table("dead_letters_v1")


def downgrade() -> None:
    for table in ("reminders", "consumer_groups", "tickets", "dead_letters", "deliveries"):
        op.drop_table(table)
