"""A partial index for the recipient limit's hourly count: only the rows that take a slot.

The count (`status IN ('sent', 'claimed') AND at > now - 1 h`, per recipient) read every
row of the recipient's hour through `ix_deliveries_recipient_at`, `throttled` ones too:
under a flood to one address, a claim walked all of them. This index holds only the
counted rows, at most the limit plus the claims in flight per recipient and hour.

Building it reads the whole `deliveries` table once and, on PostgreSQL, holds writes to it
meanwhile (seconds for a million rows).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# Frozen here on purpose, as in 0001: the condition of its day.
COUNTED = "status IN ('sent', 'claimed')"


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_recipient_counted",
        "deliveries",
        ["recipient", "at"],
        sqlite_where=sa.text(COUNTED),
        postgresql_where=sa.text(COUNTED),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_recipient_counted", table_name="deliveries")
