"""Alembic migrations of the ledger schema (run by service.delivery.ledger.migrate)."""
