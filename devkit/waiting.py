"""Waiting in tests: poll a condition until it holds, or fail naming what never happened."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def poll(
    check: Callable[[], T | Awaitable[T]],
    within: float,
    what: str | Callable[[], str],
    *,
    interval: float = 0.1,
    blocking: bool = False,
) -> T:
    """Call `check` every `interval` s until it returns something true, and return that.

    A `blocking` check (one that does I/O synchronously) runs in a thread, so the event
    loop keeps serving meanwhile. After `within` s: AssertionError naming `what` (a text,
    or a function giving one then) and the last result.
    """
    deadline = time.monotonic() + within
    while True:
        result = await asyncio.to_thread(check) if blocking else check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            wanted = what() if callable(what) else what
            raise AssertionError(
                f"after {within:.0f} s, still waiting for {wanted}; last: {result!r}"
            )
        await asyncio.sleep(interval)


async def settle(count: Callable[[], int], quiet: float = 3.0, *, interval: float = 0.2) -> int:
    """Wait until `count()` (e.g. mails received) has not changed for `quiet` s; its value."""
    value, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        await asyncio.sleep(interval)
        if count() != value:
            value, since = count(), time.monotonic()
    return value
