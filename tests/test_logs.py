"""The service's log handler: one JSON line per record, written together per loop turn."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

from service.runtime.logs import JsonFormatter, TurnHandler

REPO = Path(__file__).resolve().parent.parent


class Recording:
    """A stream that keeps each write apart, to count them."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in "".join(self.writes).splitlines()]


def logger(stream: Recording) -> logging.Logger:
    handler = TurnHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger(f"test.logs.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


async def test_lines_of_one_turn_are_written_together_when_it_ends() -> None:
    stream = Recording()
    log = logger(stream)
    for i in range(50):
        log.info("sent", extra={"n": i})
    assert stream.writes == []  # still this turn
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    assert [line["n"] for line in stream.lines()] == list(range(50))
    log.info("sent", extra={"n": 50})
    await asyncio.sleep(0)
    assert len(stream.writes) == 2


async def test_a_warning_is_written_at_once_after_what_waits() -> None:
    stream = Recording()
    log = logger(stream)
    log.info("sent", extra={"n": 1})
    log.warning("smtp refused", extra={"n": 2})
    assert [line["n"] for line in stream.lines()] == [1, 2]
    assert len(stream.writes) == 1


def test_off_the_loop_every_line_is_written_at_once() -> None:
    stream = Recording()
    log = logger(stream)
    log.info("one", extra={"n": 1})
    assert [line["n"] for line in stream.lines()] == [1]
    thread = threading.Thread(target=log.info, args=("two",), kwargs={"extra": {"n": 2}})
    thread.start()
    thread.join()
    assert [line["n"] for line in stream.lines()] == [1, 2]


async def test_what_waits_is_written_at_exit() -> None:
    stream = Recording()
    log = logger(stream)
    log.info("stopping", extra={"n": 1})
    assert stream.writes == []
    logging.shutdown([lambda: log.handlers[0]])  # what interpreter exit does
    assert [line["n"] for line in stream.lines()] == [1]


def test_lines_waiting_when_sigterm_ends_the_process_are_written() -> None:
    # What uvicorn does after a graceful shutdown: re-raise SIGTERM, from the event loop,
    # with SIGTERM's own (default) disposition back, so atexit never runs.
    script = textwrap.dedent(
        """
        import asyncio, logging, signal
        from service.runtime.logs import configure_logging

        configure_logging("INFO")

        async def main():
            logging.getLogger("uvicorn.error").info("Application shutdown complete.")
            signal.raise_signal(signal.SIGTERM)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == -signal.SIGTERM
    [line] = [json.loads(text) for text in done.stderr.splitlines()]
    assert line["msg"] == "Application shutdown complete."
