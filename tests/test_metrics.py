"""Metrics: series exist before their first count; revoked partitions drop out of the lag."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.runtime.metrics import Metrics


def test_series_exist_at_zero_before_first_use() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    sample = registry.get_sample_value
    assert sample("notifier_notifications_total", {"kind": "staff", "outcome": "sent"}) == 0
    assert (
        sample("notifier_events_total", {"type": "ticketActivity.updated", "outcome": "processed"})
        == 0
    )
    assert sample("notifier_smtp_send_seconds_count", {"outcome": "permanent"}) == 0
    assert sample("notifier_dead_letters_total", {"stage": "attachment"}) == 0


def test_lag_of_a_revoked_partition_goes_away() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.lags({0: 5, 1: 7})
    metrics.lags({0: 2})
    assert registry.get_sample_value("notifier_consumer_lag", {"partition": "0"}) == 2
    assert registry.get_sample_value("notifier_consumer_lag", {"partition": "1"}) is None


def test_unknown_event_type_is_not_a_label() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.event("ticketActivity.deleted", "dead_lettered")
    metrics.event(None, "dead_lettered")
    assert (
        registry.get_sample_value(
            "notifier_events_total", {"type": "invalid", "outcome": "dead_lettered"}
        )
        == 2
    )
