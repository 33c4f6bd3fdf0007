"""Capped exponential backoff with "equal jitter", for every retry loop of the project."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int, initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry).

    The ceiling doubles from `initial` up to `maximum`; the wait is drawn uniformly from
    its upper half ("equal jitter"), so retries spread out but never come back at once.
    """
    ceiling = min(maximum, initial * 2.0 ** min(max(attempt, 0), 30))
    return ceiling / 2 + rand() * ceiling / 2
