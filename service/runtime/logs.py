"""Structured JSON log lines: one event per line, ids as fields, never message texts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came in through `extra=` and is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: messages of third-party exceptions may quote input.
            line["exc_type"] = record.exc_info[0].__name__
        return _ENCODER.encode(line)


# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines logged during one turn of the event loop together, at its end.

    Under load one turn finishes many mails (a group commit), and one write of their lines
    costs a fraction of a write per line. Nothing waits for a timer: the lines go out as
    soon as the turn ends. Warnings and errors, and lines logged off the event loop's
    thread, are written at once (after any lines still waiting, so their order holds).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.lock:  # type: ignore[union-attr]
            self._waiting.append(line)
            first = len(self._waiting) == 1
        if loop is None or record.levelno >= logging.WARNING:
            self.flush()
        elif first:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is waiting (also at exit: logging.shutdown flushes every handler)."""
        with self.lock:  # type: ignore[union-attr]
            lines, self._waiting = self._waiting, []
            try:
                if lines:
                    self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": "log write failed"}))


def _flush_then_end(signum: int, frame: object) -> None:
    """SIGTERM's default end, after the log lines still waiting are written.

    uvicorn re-raises the SIGTERM it caught once it has shut down, so that the process
    ends "killed by SIGTERM"; that skips atexit, where logging flushes its handlers.
    """
    for handler in logging.getLogger().handlers:
        handler.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def configure_logging(level: str) -> None:
    """Send every logger's records to stderr as JSON lines at `level`."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # ValueError off the main thread: a test, not the service.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _flush_then_end)
    # What a line never shows, not looked up for every record (the logging docs'
    # "Optimization"): the caller's file and line, thread, process and process name.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TurnHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # FastStream's own logger adds a handler of its own; route it through ours.
    for name in ("faststream", "faststream.access", "uvicorn", "uvicorn.error", "aiokafka"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))
