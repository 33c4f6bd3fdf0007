"""Pipelining across transactions: a mail's end goes out with the next mail's envelope.

A raw loopback server (asyncio streams, this test's loop) logs when each line arrives and
when each reply leaves, and can answer a mail's end late or hang up instead, so the order
on the wire can be checked, and what the pool does when a connection fails under a mail
whose envelope went ahead.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from service.delivery.smtp import PermanentSmtpError, SmtpConfig, SmtpPool, TransientSmtpError
from service.delivery.smtp_wire import Withheld

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


@dataclass
class RawServer:
    """SMTP with PIPELINING: replies in order, each mail's end answered `end_delay` late."""

    end_delay: float = 0.05
    hang_up_at_end: set[int] = field(default_factory=set)  # mails (counted from 1) not answered
    log: list[tuple[float, str]] = field(default_factory=list)  # (time, "in: …" / "out: …")
    delivered: list[str] = field(default_factory=list)  # recipients whose end got a 250
    rcpt: dict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    connections: int = 0
    ends: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def first(self, entry: str) -> float:
        return next(t for t, what in self.log if what.startswith(entry))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        replies: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def answer() -> None:
            while (item := await replies.get()) is not None:
                delay, reply = item
                if delay:
                    await asyncio.sleep(delay)
                self.log.append((time.monotonic(), f"out: {reply.decode().strip()}"))
                writer.write(reply)

        answering = asyncio.create_task(answer())
        writer.write(b"220 raw ESMTP\r\n")
        recipient, in_data = "", False
        try:
            while line := await reader.readline():
                text = line.decode().rstrip("\r\n")
                if in_data:
                    if text != ".":
                        continue
                    in_data = False
                    self.ends += 1
                    self.log.append((time.monotonic(), f"in: end {recipient}"))
                    if self.ends in self.hang_up_at_end:
                        await replies.put(None)
                        await answering
                        return  # hangs up: the mail was not taken
                    self.delivered.append(recipient)
                    await replies.put((self.end_delay, b"250 taken\r\n"))
                    continue
                self.log.append((time.monotonic(), f"in: {text}"))
                verb = text[:4].upper()
                if verb == "EHLO":
                    await replies.put((0, b"250-raw\r\n250 PIPELINING\r\n"))
                elif verb == "RCPT":
                    recipient = text.split("<", 1)[1].rstrip(">")
                    self.rcpt[recipient].set()
                    await replies.put((0, b"250 ok\r\n"))
                elif verb == "DATA":
                    in_data = True
                    await replies.put((0, b"354 go on\r\n"))
                elif verb == "QUIT":
                    await replies.put((0, b"221 bye\r\n"))
                    break
                else:
                    await replies.put((0, b"250 ok\r\n"))
            await replies.put(None)
            await answering
        finally:
            answering.cancel()
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.stop()


def one_connection(server: RawServer) -> SmtpPool:
    return SmtpPool(SmtpConfig(host="127.0.0.1", port=server.port, timeout=5, pool_size=1))


async def test_the_next_envelope_goes_out_before_the_mail_ahead_is_answered(
    raw: RawServer,
) -> None:
    pool = one_connection(raw)
    await asyncio.gather(*(pool.send("a@x.test", f"u{i}@y.test", MESSAGE) for i in range(3)))
    await pool.close()
    assert raw.delivered == ["u0@y.test", "u1@y.test", "u2@y.test"]
    assert raw.connections == 1
    # u1's MAIL arrived while u0's end still waited for its 250 (end_delay), and so on.
    assert raw.first("in: RCPT TO:<u1@y.test>") < raw.first("out: 250 taken")
    ends = [t for t, what in raw.log if what == "out: 250 taken"]
    assert raw.first("in: RCPT TO:<u2@y.test>") < ends[1]


async def test_a_mail_carried_on_a_failed_connection_is_sent_on_the_next(raw: RawServer) -> None:
    raw.hang_up_at_end = {1}
    pool = one_connection(raw)
    first, second = await asyncio.gather(
        pool.send("a@x.test", "u0@y.test", MESSAGE),
        pool.send("a@x.test", "u1@y.test", MESSAGE),
        return_exceptions=True,
    )
    await pool.close()
    assert isinstance(first, TransientSmtpError)
    assert second is None
    assert raw.delivered == ["u1@y.test"]
    assert raw.connections == 2


async def test_a_withheld_mail_drops_its_connection_and_the_next_goes_on_another(
    raw: RawServer,
) -> None:
    pool = one_connection(raw)
    readied: list[str] = []

    def ready_for(name: str) -> Callable[[], object]:
        async def ready() -> None:
            readied.append(name)

        return ready

    # u0 holds the connection until u1 has queued behind it.
    u0 = asyncio.ensure_future(
        pool.send("a@x.test", "u0@y.test", MESSAGE, may_finish=lambda: False, ready=ready_for("u0"))
    )
    u1 = asyncio.ensure_future(pool.send("a@x.test", "u1@y.test", MESSAGE, ready=ready_for("u1")))
    results = await asyncio.gather(u0, u1, return_exceptions=True)
    await pool.close()
    assert isinstance(results[0], Withheld)
    assert results[1] is None
    assert raw.delivered == ["u1@y.test"]  # u0 never reached its end
    assert raw.ends == 1
    assert raw.connections == 2
    # u1 was made ready before u0's fence (the carry), and again on its new connection.
    assert readied == ["u0", "u1", "u1"]


async def test_a_cancelled_sender_s_mail_is_not_finished(raw: RawServer) -> None:
    raw.end_delay = 0.3
    pool = one_connection(raw)
    u0 = asyncio.ensure_future(pool.send("a@x.test", "u0@y.test", MESSAGE))
    u1 = asyncio.ensure_future(pool.send("a@x.test", "u1@y.test", MESSAGE))
    # u1's envelope goes out with u0's end; its sender gives up while u0 waits for its 250.
    await raw.rcpt["u1@y.test"].wait()
    u1.cancel()
    await u0
    with pytest.raises(asyncio.CancelledError):
        await u1
    await pool.send("a@x.test", "u2@y.test", MESSAGE)
    await pool.close()
    assert raw.delivered == ["u0@y.test", "u2@y.test"]


async def test_what_ready_raises_reaches_its_sender_and_the_mail_ahead_is_delivered(
    raw: RawServer,
) -> None:
    pool = one_connection(raw)

    async def lost() -> None:
        raise LookupError("another instance holds it")

    results = await asyncio.gather(
        pool.send("a@x.test", "u0@y.test", MESSAGE),
        pool.send("a@x.test", "u1@y.test", MESSAGE, ready=lost),
        pool.send("a@x.test", "u2@y.test", MESSAGE),
        return_exceptions=True,
    )
    await pool.close()
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], LookupError)
    assert raw.delivered == ["u0@y.test", "u2@y.test"]
    assert raw.connections == 1


async def test_an_unwritable_address_behind_a_mail_fails_alone(raw: RawServer) -> None:
    pool = one_connection(raw)
    results = await asyncio.gather(
        pool.send("a@x.test", "u0@y.test", MESSAGE),
        pool.send("a@x.test", "u1@y.test\r\nRCPT TO:<evil@z.test>", MESSAGE),
        pool.send("a@x.test", "u2@y.test", MESSAGE),
        return_exceptions=True,
    )
    await pool.close()
    assert isinstance(results[1], PermanentSmtpError)
    assert results[1].code == 553
    assert results[0] is None
    assert results[2] is None
    assert raw.delivered == ["u0@y.test", "u2@y.test"]
    assert not any("evil" in what for _, what in raw.log)
    assert raw.connections == 1


async def test_close_fails_queued_mails_and_leaves_no_task_behind(raw: RawServer) -> None:
    raw.end_delay = 0.2
    pool = one_connection(raw)
    sends = [
        asyncio.ensure_future(pool.send("a@x.test", f"u{i}@y.test", MESSAGE)) for i in range(4)
    ]
    await raw.rcpt["u1@y.test"].wait()  # u0's end is out, u1 carried; u2 and u3 queued
    await pool.close()
    results = await asyncio.gather(*sends, return_exceptions=True)
    # A busy connection finishes the mail it ended and the one it carries, no more.
    assert results[:2] == [None, None]
    assert all(isinstance(r, TransientSmtpError) for r in results[2:]), results
    assert raw.delivered == ["u0@y.test", "u1@y.test"]
    assert not pool._runners
    assert not pool._connections
    with pytest.raises(TransientSmtpError, match="closed"):
        await pool.send("a@x.test", "late@y.test", MESSAGE)


async def test_close_stops_a_connection_stuck_on_a_slow_server(raw: RawServer) -> None:
    raw.end_delay = 3.0
    pool = one_connection(raw)
    send = asyncio.ensure_future(pool.send("a@x.test", "u0@y.test", MESSAGE))
    await raw.rcpt["u0@y.test"].wait()
    started = time.monotonic()
    await pool.close()
    assert time.monotonic() - started < 2.5  # a second's grace, not the server's three
    with pytest.raises(TransientSmtpError, match="interrupted"):
        await send
    assert not pool._runners
    assert not pool._connections


async def test_close_settles_a_mail_whose_connection_is_still_being_opened() -> None:
    """A server that accepts but never greets: the runner is cut while connecting."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=port, timeout=30, pool_size=1))
    send = asyncio.ensure_future(pool.send("a@x.test", "u0@y.test", MESSAGE))
    await asyncio.sleep(0.1)  # the runner waits for a greeting that never comes
    await pool.close()
    with pytest.raises(TransientSmtpError, match="interrupted"):
        await asyncio.wait_for(send, 5)
    silent.close()
