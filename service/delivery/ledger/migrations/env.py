"""Alembic environment: runs on the connection (and inside the transaction) migrate.py hands it."""

from __future__ import annotations

from alembic import context

from service.delivery.ledger.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
