"""The recipient index carries `status`: the recipient limit's hourly count reads it alone.

The count (`recipient = ? AND status IN ('sent', 'claimed') AND at > now - 1 h`) walked
`ix_deliveries_recipient_at` and looked up each row in the table for its status, the
recipient's `throttled` rows too: under a flood to one address, a claim looked up every
one of them. `ix_deliveries_recipient_at_status` replaces that index (same leading
columns, so the audit's look-ups by recipient use it as before).

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
        "ix_deliveries_recipient_at_status", "deliveries", ["recipient", "at", "status"]
    )
    op.drop_index("ix_deliveries_recipient_at", table_name="deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_recipient_at", "deliveries", ["recipient", "at"])
    op.drop_index("ix_deliveries_recipient_at_status", table_name="deliveries")
