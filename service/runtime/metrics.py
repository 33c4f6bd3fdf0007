"""Prometheus metrics of the notifier; labels are bounded sets, never ids or addresses."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from service import __version__
from service.core.events import EVENT_TYPES
from service.core.failures import Stage
from service.core.routing import Kind
from service.runtime.audit.paths import ENDPOINTS

# 0.075 and 0.15 let the 150 ms objective be read straight off the histogram.
LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)

# Label sets come from the definitions they count, so a new kind or stage is exported at once.
KINDS = tuple(kind.value for kind in Kind)
NOTIFICATION_OUTCOMES = (
    "sent",
    "skipped_duplicate",
    "withheld",
    "failed_transient",
    "failed_permanent",
    "expired",
    "throttled",
)
EVENT_OUTCOMES = ("processed", "dead_lettered", "retry_later", "expired")
SMTP_OUTCOMES = ("accepted", "transient", "permanent", "withheld", "error")
REWIND_REASONS = ("retry_later", "error", "rebalanced")
REMINDER_ACTIONS = ("scheduled", "moved", "cancelled", "expired", "orphaned", "sent", "failed")
AUDIT_DENIALS = ("missing", "wrong")
AUDIT_CODES = ("200", "303", "400", "401")


class Metrics:
    """Every metric the service exports, registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "notifier_events",
            "Kafka records consumed, by event type and outcome.",
            ["type", "outcome"],
            registry=registry,
        )
        self.notifications = Counter(
            "notifier_notifications",
            "Notifications by kind and outcome.",
            ["kind", "outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "notifier_dead_letters",
            "Records sent to the dead-letter topic, by stage.",
            ["stage"],
            registry=registry,
        )
        self.retries = Counter(
            "notifier_retries", "Backoff waits before a retry.", registry=registry
        )
        self.rewinds = Counter(
            "notifier_batch_rewinds",
            "Batches rewound or left uncommitted, by reason (retry_later, error, rebalanced).",
            ["reason"],
            registry=registry,
        )
        self.smtp_send_seconds = Histogram(
            "notifier_smtp_send_seconds",
            "Time to hand one message to the SMTP server.",
            ["outcome"],
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.render_seconds = Histogram(
            "notifier_render_seconds",
            "Time to render one notification's templates.",
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.latency_seconds = Histogram(
            "notifier_delivery_latency_seconds",
            "From the event's time to the SMTP server's acceptance.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "notifier_consumer_lag",
            "Records behind the partition's end.",
            ["partition"],
            registry=registry,
        )
        self.in_flight_gauge = Gauge(
            "notifier_in_flight_notifications",
            "Notifications being sent now.",
            registry=registry,
        )
        self.pool_size = Gauge(
            "notifier_smtp_pool_size", "Configured SMTP connections.", registry=registry
        )
        self.pool_connections = Gauge(
            "notifier_smtp_pool_connections",
            "SMTP connections by state.",
            ["state"],
            registry=registry,
        )
        self.reminders = Counter(
            "notifier_reminders",
            "Reminders by what happened: scheduled, moved, cancelled, expired (too late when"
            " read), orphaned (a time without its date), sent, failed.",
            ["action"],
            registry=registry,
        )
        self.reminder_next_due = Gauge(
            "notifier_reminder_next_due_timestamp_seconds",
            "When the earliest scheduled reminder is due (Unix time); 0 when none is.",
            registry=registry,
        )
        self.group_members = Gauge(
            "notifier_group_members",
            "Members of this instance's consumer group, as last counted.",
            registry=registry,
        )
        self.unsafe_ledger = Gauge(
            "notifier_unsafe_ledger",
            "1 while other instances share the consumer group but not this (SQLite) ledger.",
            registry=registry,
        )
        self.audit_requests = Counter(
            "notifier_audit_requests",
            "Delivery audit HTTP requests (API and page), by endpoint and status code.",
            ["endpoint", "code"],
            registry=registry,
        )
        self.audit_seconds = Histogram(
            "notifier_audit_request_seconds",
            "Time to answer one delivery audit request, by endpoint.",
            ["endpoint"],
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.audit_denied = Counter(
            "notifier_audit_denied",
            "Audit requests refused (401) for a missing or a wrong token.",
            ["endpoint", "reason"],
            registry=registry,
        )
        self.build = Info("notifier_build", "Version of the notifier.", registry=registry)
        self.build.info({"version": __version__, "python": platform.python_version()})
        # Every series exists from the start, so rate() and increase() see the first count;
        # the children are kept, since labels() validates and locks on every call.
        self._notifications = {
            (kind, outcome): self.notifications.labels(kind, outcome)
            for kind in KINDS
            for outcome in NOTIFICATION_OUTCOMES
        }
        self._notifications["unknown", "unresolved"] = self.notifications.labels(
            "unknown", "unresolved"
        )
        self._events = {
            (event_type, outcome): self.events.labels(event_type, outcome)
            for event_type in (*EVENT_TYPES, "invalid")
            for outcome in EVENT_OUTCOMES
        }
        self._smtp = {outcome: self.smtp_send_seconds.labels(outcome) for outcome in SMTP_OUTCOMES}
        self._stages = {stage: self.dead_letters.labels(stage.value) for stage in Stage}
        self._rewinds = {reason: self.rewinds.labels(reason) for reason in REWIND_REASONS}
        self._reminders = {action: self.reminders.labels(action) for action in REMINDER_ACTIONS}
        self._audit_requests = {
            (endpoint, code): self.audit_requests.labels(endpoint, code)
            for endpoint in ENDPOINTS
            for code in AUDIT_CODES
        }
        self._audit_seconds = {e: self.audit_seconds.labels(e) for e in ENDPOINTS}
        self._audit_denied = {
            (endpoint, reason): self.audit_denied.labels(endpoint, reason)
            for endpoint in ENDPOINTS
            for reason in AUDIT_DENIALS
        }
        self._open = self.pool_connections.labels("open")
        self._busy = self.pool_connections.labels("busy")
        # Process memory, CPU and file descriptors, in this registry rather than the global.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

    def event(self, event_type: str | None, outcome: str) -> None:
        label = event_type if event_type in EVENT_TYPES else "invalid"
        _child(self._events, (label, outcome), self.events).inc()

    def notification(self, kind: str, outcome: str) -> None:
        _child(self._notifications, (kind, outcome), self.notifications).inc()

    def dead_letter(self, stage: Stage) -> None:
        self._stages[stage].inc()

    def retry(self) -> None:
        self.retries.inc()

    def reminder(self, action: str) -> None:
        _child(self._reminders, action, self.reminders).inc()

    def rewind(self, reason: str) -> None:
        _child(self._rewinds, reason, self.rewinds).inc()

    def delivered(self, event_time: datetime | None) -> None:
        if event_time is None:
            return
        if event_time.tzinfo is None:
            event_time = event_time.replace(tzinfo=UTC)
        elapsed = (datetime.now(UTC) - event_time).total_seconds()
        self.latency_seconds.observe(max(elapsed, 0.0))

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        self.in_flight_gauge.inc()
        try:
            yield
        finally:
            self.in_flight_gauge.dec()

    def rendered(self, seconds: float) -> None:
        """One notification's templates took `seconds` to render (here or in a worker)."""
        self.render_seconds.observe(seconds)

    def audit_answered(self, endpoint: str, code: int, seconds: float) -> None:
        """One audit request answered with HTTP status `code` after `seconds`."""
        _child(self._audit_requests, (endpoint, str(code)), self.audit_requests).inc()
        _child(self._audit_seconds, endpoint, self.audit_seconds).observe(seconds)

    def audit_refused(self, endpoint: str, reason: str) -> None:
        """One audit request without a valid token (`reason`: missing or wrong)."""
        _child(self._audit_denied, (endpoint, reason), self.audit_denied).inc()

    # PoolObserver of service.delivery.smtp
    def watch_connections(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._open.set_function(lambda: counts()[0])
        self._busy.set_function(lambda: counts()[1])

    def send_finished(self, seconds: float, outcome: str) -> None:
        _child(self._smtp, outcome, self.smtp_send_seconds).observe(seconds)

    def lags(self, records_behind: dict[int, int]) -> None:
        """Replace the lag of every partition: a revoked partition's series goes away."""
        self.consumer_lag.clear()
        for partition, behind in records_behind.items():
            self.consumer_lag.labels(str(partition)).set(behind)


def _child(children: dict[Any, Any], key: Any, metric: Any) -> Any:
    """The labelled child for `key`, made once (a label set outside the usual ones too)."""
    child = children.get(key)
    if child is None:
        labels = key if isinstance(key, tuple) else (key,)
        child = children[key] = metric.labels(*labels)
    return child
