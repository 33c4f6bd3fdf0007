"""The SMTP wire: dot-stuffing, reply parsing, the one-command-at-a-time transaction,
refusals, real servers (the pool's pipelined path: also tests/test_smtp_pipelined.py)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import pickle
from collections.abc import Iterator

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devkit.smtp import SmtpRecorder
from service.delivery.smtp import PermanentSmtpError, SmtpConfig, SmtpPool
from service.delivery.smtp_wire import (
    END_OF_DATA,
    WRITE_CHUNK,
    ConnectionLost,
    Payload,
    SmtpReplyError,
    TransactionProtocol,
    Withheld,
    dot_stuff,
    envelope_address,
    send_transaction,
    undo_dot_stuff,
)


def unstuff(payload: bytes) -> bytes:
    """What a server makes of a DATA payload (RFC 5321 §4.5.2)."""
    assert payload.endswith(b"\r\n.\r\n")
    lines = payload[: -len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def data(message: bytes) -> bytes:
    """The whole DATA payload as it goes on the wire: stuffed body, then the end marker."""
    return dot_stuff(message) + END_OF_DATA


def test_dot_stuffing() -> None:
    assert data(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert data(b".start\r\n") == b"..start\r\n.\r\n"
    assert data(b"no end") == b"no end\r\n.\r\n"
    assert data(b"a\r\n.\r\nb") == b"a\r\n..\r\nb\r\n.\r\n"


def test_bare_line_ends_are_normalised_so_nothing_is_smuggled() -> None:
    payload = data(b"a\n.\nMAIL FROM:<x@y>\rb")
    assert payload == b"a\r\n..\r\nMAIL FROM:<x@y>\r\nb\r\n.\r\n"
    assert b"\r\n.\r\n" not in payload[:-5]


@given(st.binary(max_size=300))
def test_a_payload_is_stuffed_once_and_undone_exactly(message: bytes) -> None:
    payload = dot_stuff(message)
    assert dot_stuff(payload) is payload  # a worker stuffed it: the event loop does not again
    restored = pickle.loads(pickle.dumps(payload))  # as a render worker hands it over
    assert type(restored) is Payload
    assert restored == payload
    assert dot_stuff(undo_dot_stuff(payload)) == payload
    if b"\r" not in message.replace(b"\r\n", b"") and b"\n" not in message.replace(b"\r\n", b""):
        assert undo_dot_stuff(payload) == message + (b"" if message.endswith(b"\r\n") else b"\r\n")


@given(st.binary(max_size=300))
def test_stuffed_payload_has_one_end_and_unstuffs_to_the_message(message: bytes) -> None:
    payload = data(message)
    assert payload.count(b"\r\n.\r\n") == 1
    assert payload.endswith(b"\r\n.\r\n")
    normalised = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    assert unstuff(payload) == normalised


@pytest.mark.parametrize("address", ["a@b.test>", "a b@c.test", "a@b\r\nRCPT TO:<x@y>", "ü@x"])
def test_envelope_address_refuses_what_could_break_the_command(address: str) -> None:
    with pytest.raises(ValueError):
        envelope_address(address)


class FakeTransport(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self._protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.extend(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


def wired() -> tuple[TransactionProtocol, FakeTransport]:
    protocol = TransactionProtocol()
    transport = FakeTransport()
    protocol.adopt(transport)
    return protocol, transport


async def test_a_transaction_writes_each_command_after_the_reply_before_it() -> None:
    protocol, transport = wired()
    task = asyncio.create_task(send_transaction(protocol, "a@x.test", "b@y.test", b"p\r\n"))
    script = [
        (b"MAIL FROM:<a@x.test>\r\n", b"250 ok\r\n"),
        (b"RCPT TO:<b@y.test>\r\n", b"250 ok\r\n"),
        (b"DATA\r\n", b"354 go\r\n"),
        (b"p\r\n.\r\n", b"250 queued\r\n"),
    ]
    written = b""
    for command, reply in script:
        await asyncio.sleep(0)
        written += command
        assert bytes(transport.written) == written  # nothing more before its reply
        protocol.data_received(reply)
    await task


async def test_a_refused_recipient_raises_its_code_and_stops_there() -> None:
    protocol, transport = wired()
    protocol.data_received(b"250 ok\r\n550 5.1.1 no such user\r\n")
    with pytest.raises(SmtpReplyError) as caught:
        await send_transaction(protocol, "a@x.test", "b@y.test", b"")
    assert caught.value.code == 550
    assert bytes(transport.written) == b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"


async def test_a_refused_sender_stops_at_the_first_command() -> None:
    protocol, transport = wired()
    protocol.data_received(b"451 busy\r\n")
    with pytest.raises(SmtpReplyError) as caught:
        await send_transaction(protocol, "a@x.test", "b@y.test", b"")
    assert caught.value.code == 451
    assert bytes(transport.written) == b"MAIL FROM:<a@x.test>\r\n"


async def test_a_large_mail_waits_for_the_transport_to_drain() -> None:
    protocol, transport = wired()
    protocol.data_received(b"250 ok\r\n250 ok\r\n354 go\r\n")
    payload = b"x" * (WRITE_CHUNK * 3)
    protocol.pause_writing()  # the transport's buffer is above its high-water mark
    task = asyncio.create_task(send_transaction(protocol, "a@x.test", "b@y.test", payload))
    for _ in range(5):
        await asyncio.sleep(0)
    head = len(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert len(transport.written) == head + WRITE_CHUNK  # one piece, then it waits
    protocol.resume_writing()
    for _ in range(5):
        await asyncio.sleep(0)
    assert bytes(transport.written).endswith(payload + END_OF_DATA)
    protocol.data_received(b"250 queued\r\n")
    await task


async def test_a_mail_the_caller_withholds_at_the_end_is_not_finished() -> None:
    protocol, transport = wired()
    protocol.data_received(b"250 ok\r\n250 ok\r\n354 go\r\n")
    with pytest.raises(Withheld):
        await send_transaction(
            protocol, "a@x.test", "b@y.test", b"body\r\n", may_finish=lambda: False
        )
    # Neither the mail's last piece (here all of it) nor the end of DATA was written.
    assert bytes(transport.written).endswith(b"DATA\r\n")
    assert transport.aborted


async def test_a_large_mail_withheld_at_the_end_stops_before_its_last_piece() -> None:
    protocol, transport = wired()
    protocol.data_received(b"250 ok\r\n250 ok\r\n354 go\r\n")
    payload = b"a" * WRITE_CHUNK + b"b" * 10
    with pytest.raises(Withheld):
        await send_transaction(protocol, "a@x.test", "b@y.test", payload, may_finish=lambda: False)
    assert bytes(transport.written).endswith(b"DATA\r\n" + b"a" * WRITE_CHUNK)
    assert transport.aborted


async def test_aiosmtplib_still_hands_over_its_transport(any_server: SmtpRecorder) -> None:
    # The fast path adopts aiosmtplib's connected transport (pinned below aiosmtplib 6 in
    # pyproject.toml). If a new release hides or wraps it, this fails first and loudly.
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=any_server.port, timeout=5)
    await client.connect()
    try:
        assert isinstance(client.transport, asyncio.Transport)
        protocol = TransactionProtocol()
        protocol.adopt(client.transport)
        protocol.write(b"NOOP\r\n")
        assert (await protocol.reply())[0] == 250
    finally:
        client.close()


async def test_plain_aiosmtplib_sends_when_pipelining_is_off(any_server: SmtpRecorder) -> None:
    config = SmtpConfig(host="127.0.0.1", port=any_server.port, timeout=5, pipelining=False)
    pool = SmtpPool(config)
    body = b"Subject: plain\r\n\r\n.dot\r\n"
    await pool.send("a@x.test", "b@y.test", body)
    await pool.send("a@x.test", "b@y.test", dot_stuff(body))  # as a worker built it
    any_server.fail_rcpt("gone@y.test", code=550)
    with pytest.raises(PermanentSmtpError) as caught:
        await pool.send("a@x.test", "gone@y.test", body)
    assert caught.value.code == 550
    with pytest.raises(Withheld):
        await pool.send("a@x.test", "c@y.test", body, may_finish=lambda: False)
    await pool.close()
    assert [m.data for m in any_server.messages] == [body, body]


async def test_garbage_or_a_hang_up_is_connection_lost() -> None:
    protocol, transport = wired()
    protocol.data_received(b"hello?\r\n")
    with pytest.raises(ConnectionLost):
        await protocol.reply()
    assert transport.closing
    protocol, _ = wired()
    waiting = asyncio.create_task(protocol.reply())
    await asyncio.sleep(0)
    protocol.connection_lost(None)
    with pytest.raises(ConnectionLost):
        await waiting


@pytest.fixture(params=["plain", "pipelining"])
def any_server(request: pytest.FixtureRequest) -> Iterator[SmtpRecorder]:
    server = SmtpRecorder(pipelining=request.param == "pipelining")
    server.start()
    yield server
    server.stop()


async def test_lines_starting_with_a_dot_arrive_intact(any_server: SmtpRecorder) -> None:
    smtp_server = any_server
    pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=smtp_server.port, timeout=5))
    body = b"Subject: dots\r\n\r\n.\r\n..two\r\n.three\r\nend\r\n"
    await pool.send("a@x.test", "b@y.test", body)
    smtp_server.fail_rcpt("gone@y.test", code=550)
    with pytest.raises(PermanentSmtpError):
        await pool.send("a@x.test", "gone@y.test", body)
    await pool.send("a@x.test", "c@y.test", dot_stuff(body))  # as a worker built it
    assert [c.pipelining for c in pool._connections] == [smtp_server.pipelining]
    await pool.close()
    assert [m.data for m in smtp_server.messages] == [body, body]
    parsed = email.message_from_bytes(smtp_server.messages[0].data, policy=email.policy.default)
    assert parsed["Subject"] == "dots"


def test_the_fast_path_runs_on_uvloop(any_server: SmtpRecorder) -> None:
    """`notifier run` uses uvloop (NOTIFY_EVENT_LOOP): its transports are adopted too."""
    import uvloop

    async def send() -> None:
        pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=any_server.port, timeout=5))
        await pool.send("a@x.test", "b@y.test", b"Subject: uv\r\n\r\n.dot\r\n")
        await pool.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(send())
    assert [m.data for m in any_server.messages] == [b"Subject: uv\r\n\r\n.dot\r\n"]


async def test_a_mail_of_many_pieces_arrives_whole(any_server: SmtpRecorder) -> None:
    # Written in WRITE_CHUNK pieces (the last with the end of DATA, and on a PIPELINING
    # server with the next mail's envelope): the server gets each mail intact.
    pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=any_server.port, timeout=5, pool_size=1))
    line = b"." + b"x" * 70 + b"\r\n"
    bodies = [
        b"Subject: big %d\r\n\r\n" % i + line * (WRITE_CHUNK * 3 // len(line) + i) for i in range(3)
    ]
    await asyncio.gather(*(pool.send("a@x.test", f"u{i}@y.test", b) for i, b in enumerate(bodies)))
    await pool.close()
    assert sorted(m.data for m in any_server.messages) == sorted(bodies)
