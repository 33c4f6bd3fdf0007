"""The recipient index by status, then time: the hourly count reads only counted rows.

The recipient limit's count (`recipient = ? AND status IN ('sent', 'claimed') AND
at > now - 1 h`, once per recipient in every claim, under the recipient's advisory lock on
PostgreSQL) read `ix_deliveries_recipient_at` and went through every row of the
recipient's hour, the `throttled` ones too: under a flood to one address, a claim walked
all of them. `ix_deliveries_recipient_status_at` replaces it: the count seeks the `sent`
and the `claimed` ranges of the recipient and reads nothing else.

The price, chosen knowingly: the audit's look-ups by recipient alone (no status) now read
all of that recipient's rows and sort them, rather than the newest first from the index.
For an ordinary address that is a few hundred rows; for one with 100,000, a page of its
newest 100 took 273 ms on SQLite (1.2 ms before) and 1.6 ms on PostgreSQL (1.5 before).
A look-up by recipient and status uses the index fully.

Building it reads `deliveries` once and, on PostgreSQL, holds writes to it meanwhile.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_recipient_status_at", "deliveries", ["recipient", "status", "at"]
    )
    op.drop_index("ix_deliveries_recipient_at", table_name="deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_recipient_at", "deliveries", ["recipient", "at"])
    op.drop_index("ix_deliveries_recipient_status_at", table_name="deliveries")
