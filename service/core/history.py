"""Section 10's history guard: a record from before this group's first start is not mail."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HistoryGuard:
    """When this consumer group first started on its ledger, and how far back it serves.

    Times are epoch seconds, as Kafka record timestamps (divided by 1000) are.
    """

    first_start: float
    grace_seconds: float = 3600.0
    max_age_seconds: float | None = None  # NOTIFY_MAX_EVENT_AGE_HOURS; None: no limit

    def reason(self, record_time: float | None, now: float) -> str | None:
        """Why a record written at `record_time` is expired without mail, or None to serve it.

        A record older than the grace window before the first start is `history`: the
        topic's retained past, re-read by a new deployment, group id or ledger. Anything
        after that is served however late (an SMTP outage delays mail, it does not drop
        it), unless the operator set a maximum age.
        """
        if record_time is None:
            return None
        if record_time < self.first_start - self.grace_seconds:
            return "history"
        if self.max_age_seconds is not None and now - record_time > self.max_age_seconds:
            return "too old"
        return None
