"""`python -m benchmarks.serve`: the service's app served by uvicorn, as `notifier run` does.

The same `create_app(load_settings())` and JSON logging as `service.cli.cmd_run`, without
the CLI layer; `benchmarks.run --launcher` uses it.

For estimating proposals without editing the service, BENCH_EXPERIMENTS (comma-separated)
patches the service in this process only:

- `batch-timeout=MS`: FastStream's `batch_timeout_ms` (default 200), which is also how
  long its batch subscriber sleeps after an empty poll;
- `ledger-reads-on-loop`: `SqliteLedger.sent` / `dead_lettered` query a second (WAL
  reader) connection on the event loop instead of hopping to the ledger thread;
- `buffered-logs`: log records go through a MemoryHandler flushed every 100 ms (and at
  once for WARNING and above) instead of one write per line;
- `no-css-inline`: skip css-inline (NOT equivalent output: only to size its cost);
- `lean-smtp`: after aiosmtplib has connected (EHLO, STARTTLS, AUTH), the pool swaps the
  connection's protocol for a minimal one and sends each mail as one pipelined
  MAIL/RCPT/DATA (RFC 2920) plus the dot-stuffed body (prototype: replies are checked and
  classified, but a refused transaction drops the connection instead of sending RSET).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import logging.handlers
import os
import sqlite3
import sys
import threading
from typing import Any

import uvicorn

from service.runtime.app import create_app
from service.runtime.logs import configure_logging
from service.runtime.settings import SettingsError, load_settings


def _batch_timeout(ms: int) -> None:
    from faststream.kafka import KafkaBroker

    original = KafkaBroker.subscriber

    @functools.wraps(original)
    def subscriber(self: KafkaBroker, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("batch_timeout_ms", ms)
        return original(self, *args, **kwargs)

    KafkaBroker.subscriber = subscriber  # type: ignore[method-assign]


def _ledger_reads_on_loop() -> None:
    from service.delivery.ledger.sqlite import SqliteLedger

    original_open, original_sent, original_dead = (
        SqliteLedger.open,
        SqliteLedger.sent,
        SqliteLedger.dead_lettered,
    )
    readers: dict[int, sqlite3.Connection] = {}

    async def open_(self: SqliteLedger) -> None:
        await original_open(self)
        if self._url.path != ":memory:":
            readers[id(self)] = sqlite3.connect(self._url.path, isolation_level=None)

    async def sent(self: SqliteLedger, keys: Any) -> set[Any]:
        reader = readers.get(id(self))
        if reader is None or not keys:
            return await original_sent(self, keys)
        query = (
            "SELECT 1 FROM deliveries WHERE activity_id=? AND kind=? AND recipient=?"
            " AND moment=? AND status='sent'"
        )
        return {key for key in keys if reader.execute(query, key).fetchone() is not None}

    async def dead_lettered(self: SqliteLedger, topic: str, partition: int, offset: int) -> bool:
        reader = readers.get(id(self))
        if reader is None:
            return await original_dead(self, topic, partition, offset)
        query = 'SELECT 1 FROM dead_letters WHERE topic=? AND partition=? AND "offset"=?'
        return reader.execute(query, (topic, partition, offset)).fetchone() is not None

    SqliteLedger.open = open_  # type: ignore[method-assign]
    SqliteLedger.sent = sent  # type: ignore[method-assign]
    SqliteLedger.dead_lettered = dead_lettered  # type: ignore[method-assign]


def _buffered_logs() -> None:
    root = logging.getLogger()
    buffered = [
        logging.handlers.MemoryHandler(1024, logging.WARNING, target=h, flushOnClose=True)
        for h in root.handlers
    ]
    root.handlers[:] = buffered

    def flush() -> None:
        while True:
            threading.Event().wait(0.1)
            for handler in buffered:
                handler.flush()

    threading.Thread(target=flush, name="log-flush", daemon=True).start()


def _no_css_inline() -> None:
    from service.core.render import Renderer

    original = Renderer.__init__

    def init(self: Renderer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)

        class Identity:
            def inline(self, html: str) -> str:
                return html

        self._inliner = Identity()  # type: ignore[assignment]

    Renderer.__init__ = init  # type: ignore[method-assign]


class _LeanSmtp(asyncio.Protocol):
    """Reads SMTP replies (multi-line aware) into a queue of futures, one per command."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.waiters: collections.deque[asyncio.Future[tuple[int, bytes]]] = collections.deque()
        self.lines: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n")) >= 0:
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            self.lines.append(line[4:])
            if line[3:4] == b"-":
                continue
            text, self.lines = b" ".join(self.lines), []
            if self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result((int(line[:3]), text))

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("connection lost"))

    def expect(self) -> asyncio.Future[tuple[int, bytes]]:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return waiter

    async def sendmail(self, sender: str, recipient: str, message: bytes, seconds: float) -> None:
        from service.delivery.smtp import _classify

        write = self.transport.write  # type: ignore[attr-defined]
        replies = [self.expect() for _ in range(3)]
        write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        async with asyncio.timeout(seconds):
            for waiter, want in zip(replies, (250, 250, 354), strict=True):
                code, text = await waiter
                if code != want and not (want == 250 and code == 251):
                    raise _classify(code, text.decode(errors="replace"))
            body = message.replace(b"\r\n.", b"\r\n..")
            if body.startswith(b"."):
                body = b"." + body
            done = self.expect()
            write(body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"))
            code, text = await done
            if code != 250:
                raise _classify(code, text.decode(errors="replace"))


def _lean_smtp() -> None:
    import aiosmtplib

    from service.delivery.smtp import SmtpPool, TransientSmtpError

    leans: dict[int, _LeanSmtp] = {}
    original_close = SmtpPool.close

    async def transact(
        self: SmtpPool, client: aiosmtplib.SMTP, sender: str, recipient: str, message: bytes
    ) -> None:
        lean = leans.get(id(client))
        if lean is None:
            transport = client.transport
            if transport is None:
                raise TransientSmtpError("not connected")
            lean = leans[id(client)] = _LeanSmtp(transport)
            transport.set_protocol(lean)
        try:
            await lean.sendmail(sender, recipient, message, self._config.timeout)
        except (OSError, TimeoutError) as exc:
            leans.pop(id(client), None)
            raise TransientSmtpError(f"{type(exc).__name__}") from exc
        except BaseException:
            leans.pop(id(client), None)
            raise

    async def close(self: SmtpPool) -> None:
        for client in self._idle:
            lean = leans.pop(id(client), None)
            if lean is not None:
                lean.transport.write(b"QUIT\r\n")  # type: ignore[attr-defined]
                lean.transport.close()
        self._idle = [c for c in self._idle if id(c) in leans]
        await original_close(self)

    SmtpPool._transact = transact  # type: ignore[method-assign]
    SmtpPool.close = close  # type: ignore[method-assign]


def main() -> int:
    experiments = [e for e in os.environ.get("BENCH_EXPERIMENTS", "").split(",") if e]
    for experiment in experiments:
        name, _, value = experiment.partition("=")
        if name == "batch-timeout":
            _batch_timeout(int(value))
        elif name == "ledger-reads-on-loop":
            _ledger_reads_on_loop()
        elif name == "no-css-inline":
            _no_css_inline()
        elif name == "lean-smtp":
            _lean_smtp()
        elif name != "buffered-logs":
            print(f"benchmarks.serve: unknown experiment {name!r}", file=sys.stderr)
            return 2
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        if "buffered-logs" in experiments:
            _buffered_logs()
        app = create_app(settings)
    except SettingsError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    asyncio.run(uvicorn.Server(config).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
