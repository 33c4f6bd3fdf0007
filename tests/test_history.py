"""The history guard on plain numbers: what is history, what is too old, what is served."""

from __future__ import annotations

import pytest

from service.core.history import HistoryGuard

START = 1_800_000_000.0
HOUR = 3600.0


@pytest.mark.parametrize(
    ("written", "now", "expected"),
    [
        (START - 7 * 24 * HOUR, START, "history"),  # a week of retained past
        (START - HOUR - 1, START, "history"),  # just outside the grace window
        (START - HOUR + 1, START, None),  # inside it: a restart right after deploying
        (START + 10, START + 3 * 24 * HOUR, None),  # after the start, days late: served
        (None, START, None),  # no timestamp: nothing to judge by
    ],
)
def test_history_is_what_came_before_the_first_start(
    written: float | None, now: float, expected: str | None
) -> None:
    assert HistoryGuard(START, grace_seconds=HOUR).reason(written, now) == expected


def test_a_maximum_age_expires_late_records_too() -> None:
    guard = HistoryGuard(START, grace_seconds=HOUR, max_age_seconds=48 * HOUR)
    assert guard.reason(START + 10, START + 49 * HOUR) == "too old"
    assert guard.reason(START + 10, START + 47 * HOUR) is None
    # History stays history, whatever the age limit says.
    assert guard.reason(START - 2 * HOUR, START) == "history"
