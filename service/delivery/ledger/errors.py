"""The ledger's failures: one transient type the dispatcher rewinds on, and the fatal ones."""

from __future__ import annotations


class LedgerError(Exception):
    """The ledger cannot be used; the message is one line and never holds a password."""


class LedgerUnavailable(LedgerError, ConnectionError):
    """Transient: the database is unreachable or went away. Rewind and try again later."""


class LedgerConfigError(LedgerError):
    """Permanent: a malformed URL, a wrong password, a missing database. Stop start-up.

    The message starts with `NOTIFY_LEDGER_URL: `, the setting at fault.
    """


class LedgerSchemaError(LedgerError):
    """The database's schema is newer than this code, or behind it with migration off."""
