"""SMTP mail transactions on a connection aiosmtplib opened, without aiosmtplib's per-command cost.

aiosmtplib does the connection set-up (greeting, EHLO, STARTTLS, AUTH); then this protocol
takes the transport over, dot-stuffs with one bytes.replace, and waits under one timeout
per transaction: a fraction of aiosmtplib's CPU per mail (benchmarks/README.md has the
figures). When the server offers PIPELINING (RFC 2920), the pool writes MAIL, RCPT and DATA
as one group and one mail's end together with the next mail's envelope, from the pieces
here (`envelope`, `expect_envelope`, `write_all_but_last`; service/delivery/smtp.py);
`send_transaction` is the one-command-at-a-time transaction for servers that do not offer
it. The adoption relies on aiosmtplib exposing its transport;
tests/test_smtp_transaction.py fails loudly if a new aiosmtplib stops allowing it, and
NOTIFY_SMTP_PIPELINING=false uses plain aiosmtplib.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Callable
from typing import cast

from aiosmtplib import SMTPStatus

# A reply line: three digits, then "-" (more lines follow) or " "/end (RFC 5321 §4.2).
_REPLY_LINE = re.compile(rb"(\d{3})([ -]?)(.*)")
MAX_REPLY_BYTES = 64 * 1024
# A large mail is written in pieces of this size, each after the transport drained below
# its high-water mark, so a slow server holds back our writes instead of our memory.
WRITE_CHUNK = 256 * 1024
END_OF_DATA = b".\r\n"
# Anything an address may not carry on the wire: controls, spaces and angle brackets.
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


class SmtpReplyError(Exception):
    """The server answered a command with something other than the expected success."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class ConnectionLost(ConnectionError):
    """The server closed the connection or sent something that is not SMTP."""


class Withheld(Exception):
    """The caller's last check before the end of DATA said no: nothing was delivered."""


class TransactionProtocol(asyncio.Protocol):
    """Collects complete replies in order; one waiter at a time reads them."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: collections.deque[tuple[int, str]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused
        self.transport: asyncio.WriteTransport | None = None

    @property
    def closed(self) -> bool:
        return self._error is not None or self.transport is None or self.transport.is_closing()

    def adopt(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports write like asyncio's without deriving from WriteTransport.
        self.transport = cast(asyncio.WriteTransport, transport)
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(ConnectionLost("reply too long"))
            return
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            match = _REPLY_LINE.fullmatch(line)
            if match is None:
                self._fail(ConnectionLost("malformed reply"))
                return
            self._lines.append(match.group(3))
            if match.group(2) != b"-":
                text = b" ".join(self._lines).decode("utf-8", "replace")
                self._lines = []
                self._replies.append((int(match.group(1)), text))
        if self._replies:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost("connection lost"))

    def eof_received(self) -> bool:
        self._fail(ConnectionLost("server closed the connection"))
        return False

    def pause_writing(self) -> None:
        # asyncio calls this when the transport's buffer passes its high-water mark.
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def drain(self) -> None:
        """Return once the transport's buffer is below its high-water mark again."""
        if self._error is not None:
            raise self._error
        if self._writable is not None:
            await self._writable
            if self._error is not None:
                raise self._error

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def reply(self) -> tuple[int, str]:
        """The next reply, in the order the commands were written."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        return self._replies.popleft()

    def write(self, data: bytes | memoryview) -> None:
        if self.closed or self.transport is None:
            raise self._error or ConnectionLost("connection closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._error is None:
                self.transport.write(b"QUIT\r\n")
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes included (mid-DATA: nothing is sent)."""
        if self.transport is not None:
            self.transport.abort()
        self._fail(ConnectionLost("aborted"))


class Payload(bytes):
    """A DATA payload on the wire's terms, as `dot_stuff` returns it: CRLF line ends,
    leading dots doubled, a CRLF at its end.

    `dot_stuff` passes one through unchanged, so the work is done once, where the mail is
    built (a render worker), rather than on the event loop that sends it.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[type[Payload], tuple[bytes]]:
        # As plain bytes: a few times cheaper to pickle than a subclass's default.
        return (Payload, (bytes(self),))


def dot_stuff(message: bytes) -> Payload:
    """The DATA payload without its end: CRLF line ends, leading dots doubled (§4.5.2).

    The caller writes END_OF_DATA (".\\r\\n") after it.
    """
    if type(message) is Payload:
        return message
    # A bare CR or LF could smuggle a second message past some servers: normalise them.
    # (Counting allocates nothing; our MIME builder writes CRLF only, so this rarely fires.)
    pairs = message.count(b"\r\n")
    if message.count(b"\r") != pairs or message.count(b"\n") != pairs:
        message = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return Payload(message.replace(b"\r\n.", b"\r\n.."))


def undo_dot_stuff(payload: Payload) -> bytes:
    """The message back from its payload (for a client that stuffs on its own)."""
    message = bytes(payload)
    if message.startswith(b".."):
        message = message[1:]
    return message.replace(b"\r\n..", b"\r\n.")


def envelope_address(address: str) -> bytes:
    """`<address>` for MAIL/RCPT, refusing anything that could break the command line."""
    if _BAD_ADDRESS.search(address) or not address.isascii():
        raise ValueError("address cannot be sent in an SMTP command")
    return f"<{address}>".encode("ascii")


def envelope(sender: str, recipient: str) -> bytes:
    """MAIL, RCPT and DATA, as one pipelined group (RFC 2920 §3.1: DATA is its last)."""
    return b"MAIL FROM:%s\r\nRCPT TO:%s\r\nDATA\r\n" % (
        envelope_address(sender),
        envelope_address(recipient),
    )


# MAIL and RCPT succeed with any 2xx (251 forwards), DATA asks for input with 354.
_ENVELOPE_REPLIES = (2, 2, SMTPStatus.start_input // 100)


async def expect_envelope(protocol: TransactionProtocol) -> None:
    """Read the three replies to a pipelined envelope; raise the first refusal."""
    replies = [await protocol.reply() for _ in _ENVELOPE_REPLIES]
    for (code, text), wanted in zip(replies, _ENVELOPE_REPLIES, strict=True):
        if code // 100 != wanted:
            raise SmtpReplyError(code, text)


async def write_all_but_last(protocol: TransactionProtocol, payload: bytes) -> bytes:
    """Write a payload's pieces but its last, each once the transport has drained; return
    the last one, which ends the mail when written with END_OF_DATA."""
    view = memoryview(payload)
    last = max(0, (len(view) - 1) // WRITE_CHUNK * WRITE_CHUNK)  # where the last piece starts
    for start in range(0, last, WRITE_CHUNK):
        protocol.write(view[start : start + WRITE_CHUNK])
        await protocol.drain()
    return bytes(view[last:])


async def send_transaction(
    protocol: TransactionProtocol,
    sender: str,
    recipient: str,
    payload: bytes,
    may_finish: Callable[[], bool] | None = None,
) -> None:
    """MAIL, RCPT, DATA (each awaiting its reply: a server without PIPELINING) and the
    payload (already dot-stuffed); raise on any refusal.

    `may_finish` is asked right before the end of DATA, the moment the server takes the
    mail: if it says no, the connection is dropped unfinished (the server discards the
    message, RFC 5321 §4.1.1.4) and Withheld is raised. Nothing else is awaited between that
    check and the write of the five bytes that end the mail.

    After a refusal the caller drops the connection rather than trying RSET, which costs
    one reconnect on a rare event.
    """
    commands = (
        b"MAIL FROM:" + envelope_address(sender) + b"\r\n",
        b"RCPT TO:" + envelope_address(recipient) + b"\r\n",
        b"DATA\r\n",
    )
    for command, wanted in zip(commands, _ENVELOPE_REPLIES, strict=True):
        protocol.write(command)
        code, text = await protocol.reply()
        if code // 100 != wanted:
            raise SmtpReplyError(code, text)
    last = await write_all_but_last(protocol, payload)
    if may_finish is not None and not may_finish():
        protocol.abort()
        raise Withheld
    # The last piece and the end of DATA in one write (one segment for most mails).
    protocol.write(last + END_OF_DATA)
    code, text = await protocol.reply()
    if code // 100 != SMTPStatus.completed // 100:
        raise SmtpReplyError(code, text)
