"""One SMTP mail transaction, pipelined (RFC 2920), on a connection aiosmtplib opened.

aiosmtplib does the connection set-up (greeting, EHLO, STARTTLS, AUTH); then this protocol
takes the transport over. It sends MAIL, RCPT and DATA in one write when the server offers
PIPELINING, dot-stuffs with one bytes.replace, and waits under one timeout per
transaction: about a seventh of aiosmtplib's CPU per mail (benchmarks/out/breakdown.json).
"""

from __future__ import annotations

import asyncio
import collections
import re

# A reply line: three digits, then "-" (more lines follow) or " "/end (RFC 5321 §4.2).
_REPLY_LINE = re.compile(rb"(\d{3})([ -]?)(.*)")
MAX_REPLY_BYTES = 64 * 1024
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


class TransactionProtocol(asyncio.Protocol):
    """Collects complete replies in order; one waiter at a time reads them."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: collections.deque[tuple[int, str]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.transport: asyncio.WriteTransport | None = None

    @property
    def closed(self) -> bool:
        return self._error is not None or self.transport is None or self.transport.is_closing()

    def adopt(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
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

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()
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

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise self._error or ConnectionLost("connection closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._error is None:
                self.transport.write(b"QUIT\r\n")
            self.transport.close()


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, ended by CRLF.CRLF (§4.5.2)."""
    # A bare CR or LF could smuggle a second message past some servers: normalise them.
    # (Counting allocates nothing; our MIME builder writes CRLF only, so this rarely fires.)
    pairs = message.count(b"\r\n")
    if message.count(b"\r") != pairs or message.count(b"\n") != pairs:
        message = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def envelope_address(address: str) -> bytes:
    """`<address>` for MAIL/RCPT, refusing anything that could break the command line."""
    if _BAD_ADDRESS.search(address) or not address.isascii():
        raise ValueError("address cannot be sent in an SMTP command")
    return f"<{address}>".encode("ascii")


async def send_transaction(
    protocol: TransactionProtocol, sender: str, recipient: str, payload: bytes, pipelining: bool
) -> None:
    """MAIL, RCPT, DATA and the payload (already dot-stuffed); raise on any refusal.

    After a refusal the connection is in an unknown state mid-pipeline: the caller drops
    it rather than trying RSET, which costs one reconnect on a rare event.
    """
    mail = b"MAIL FROM:" + envelope_address(sender) + b"\r\n"
    rcpt = b"RCPT TO:" + envelope_address(recipient) + b"\r\n"
    # MAIL and RCPT succeed with any 2xx (251 forwards), DATA asks for input with 354.
    expected = ((mail, 2), (rcpt, 2), (b"DATA\r\n", 3))
    if pipelining:
        # RFC 2920 §3.1: MAIL, RCPT and DATA may go in one batch; DATA is the last.
        protocol.write(b"".join(command for command, _ in expected))
        replies = [await protocol.reply() for _ in expected]
    else:
        replies = []
        for command, _ in expected:
            protocol.write(command)
            replies.append(await protocol.reply())
            if replies[-1][0] >= 400:
                break
    for (code, text), (_, wanted) in zip(replies, expected, strict=False):
        if code // 100 != wanted:
            raise SmtpReplyError(code, text)
    protocol.write(payload)
    code, text = await protocol.reply()
    if code // 100 != 2:
        raise SmtpReplyError(code, text)
