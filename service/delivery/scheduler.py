"""The reminder scheduler inside `notifier run`: no cron, no second process to deploy.

It sleeps until the earliest scheduled moment in the ledger and wakes early when a batch of
this instance schedules a nearer one. Instances sharing a PostgreSQL ledger each take due
reminders with FOR UPDATE SKIP LOCKED, so each is sent by one of them; a reminder another
instance scheduled and then could not send (it died) is picked up at the next look, at
most `recheck` seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from service.delivery.dispatch import Dispatcher
from service.delivery.ledger import Ledger, LedgerUnavailable
from service.runtime.metrics import Metrics

log = logging.getLogger("service.delivery.scheduler")

# Reminders taken per round; the rest of a crowd of due ones come in the next rounds.
TAKE = 50
# A due reminder another instance holds (its lease runs): look again this soon.
HELD_PAUSE_SECONDS = 5.0


class ReminderScheduler:
    """Sends reminders when they fall due, one round at a time."""

    def __init__(
        self,
        ledger: Ledger,
        dispatcher: Dispatcher,
        metrics: Metrics,
        *,
        owner: str,
        lease_seconds: float,
        recheck: float = 60.0,
    ) -> None:
        self._ledger = ledger
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._owner = owner
        self._lease = lease_seconds
        self._recheck = recheck
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._until = 0.0  # when the current sleep ends (epoch seconds)
        self._task: asyncio.Task[None] | None = None
        dispatcher.on_scheduled = self.scheduled

    def scheduled(self, moment: float) -> None:
        """A batch scheduled a reminder at `moment`: wake now if that is sooner."""
        if moment < self._until:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 (bounded shutdown)
        """Let the round in progress finish (within `timeout`), then stop."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout)

    async def _run(self) -> None:
        while not self._stop.is_set():
            delay = await self._round()
            self._until = time.time() + delay
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _round(self) -> float:
        """Send what is due; how long to sleep before the next look."""
        try:
            due = await self._ledger.next_reminder_due()
            self._metrics.reminder_next_due.set(due or 0)
            now = time.time()
            if due is None:
                return self._recheck
            if due > now:
                return min(self._recheck, due - now)
            rows = await self._ledger.take_due_reminders(self._owner, self._lease, TAKE)
            if not rows:
                return HELD_PAUSE_SECONDS
            await self._dispatcher.send_reminders(rows)
            return 0.0
        except LedgerUnavailable as exc:
            log.warning("reminders not looked at", extra={"error": type(exc).__name__})
            return HELD_PAUSE_SECONDS
        except Exception as exc:
            # The scheduler must outlive any one bad round; the reminders stay stored.
            log.error("reminder round failed", extra={"error": type(exc).__name__})
            return HELD_PAUSE_SECONDS
