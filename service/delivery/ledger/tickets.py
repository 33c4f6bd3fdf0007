"""Ticket references for the audit: written with the group commit, and only when new."""

from __future__ import annotations

import time
from dataclasses import dataclass

REWRITE_SECONDS = 3600.0
"""A known reference is written again after this long, so pruning by age never loses the
reference of a ticket that is still active."""
CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Ticket:
    """A ticket id and the reference people know it by (`T-1042`)."""

    ticket_id: str
    reference: str


class TicketCache:
    """What this process wrote lately, so a busy ticket costs one write an hour, not one a mail."""

    def __init__(self) -> None:
        self._written: dict[str, tuple[str, float]] = {}

    def known(self, ticket_id: str, reference: str) -> bool:
        found = self._written.get(ticket_id)
        return (
            found is not None
            and found[0] == reference
            and time.monotonic() - found[1] < REWRITE_SECONDS
        )

    def remember(self, ticket_id: str, reference: str) -> None:
        if len(self._written) >= CACHE_MAX:
            self._written.clear()
        self._written[ticket_id] = (reference, time.monotonic())
