"""A bounded pool of reused SMTP connections that sorts failures into transient and permanent."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import aiosmtplib
from aiosmtplib import SMTPStatus

from service.core.text import one_line
from service.delivery.smtp_wire import (
    Payload,
    SmtpReplyError,
    TransactionProtocol,
    Withheld,
    dot_stuff,
    send_transaction,
    undo_dot_stuff,
)

Security = Literal["none", "starttls", "tls"]


class TransientSmtpError(Exception):
    """Worth retrying: connection trouble, timeouts, 4xx replies (RFC 5321 §4.2.1)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


class PermanentSmtpError(Exception):
    """Not worth retrying: a 5xx reply to this transaction (RFC 5321 §4.2.1)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code


class Mailer(Protocol):
    """What the dispatcher needs to hand a message to the SMTP server."""

    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Callable[[], bool] | None = None,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Return once the server accepted the message, or raise one of the errors above.

        `ready`, if given, is awaited with a connection in hand, right before the
        transaction starts (whatever it raises ends the send, nothing written).
        `may_finish`, if given, is asked right before the server would take the mail; when
        it says no, nothing is delivered and Withheld is raised.
        """
        ...


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how to connect."""

    host: str
    port: int
    security: Security = "none"
    ca_file: str | None = None  # a private CA for the server's certificate; else the system's
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    pool_size: int = 8
    # False: plain aiosmtplib transactions instead of our pipelined fast path.
    pipelining: bool = True


@dataclass(slots=True)
class _Connection:
    """A connection past EHLO/STARTTLS/AUTH: aiosmtplib's, or taken over by our protocol."""

    client: aiosmtplib.SMTP
    protocol: TransactionProtocol | None  # None: plain aiosmtplib transactions
    pipelining: bool

    @property
    def closed(self) -> bool:
        if self.protocol is not None:
            return self.protocol.closed
        return not self.client.is_connected


class PoolObserver(Protocol):
    """Receives pool events for metrics; the pool itself stays free of Prometheus."""

    def watch_connections(self, counts: Callable[[], tuple[int, int]]) -> None:
        """`counts()` gives the open and busy connections whenever metrics are read (a
        gauge set on every send cost more than the send's own bookkeeping)."""
        ...

    def send_finished(self, seconds: float, outcome: str) -> None: ...


class _NoObserver:
    def watch_connections(self, counts: Callable[[], tuple[int, int]]) -> None:
        pass

    def send_finished(self, seconds: float, outcome: str) -> None:
        pass


def _short(message: str) -> str:
    # Server replies end up in logs and dead-letter headers: keep them one short line.
    return one_line(message, 200)


class SmtpPool:
    """Up to `pool_size` connections, opened on demand and reused; a broken one is dropped."""

    def __init__(self, config: SmtpConfig, observer: PoolObserver | None = None) -> None:
        self._config = config
        self._observer: PoolObserver = observer or _NoObserver()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(config.pool_size)
        self._open = 0
        self._busy = 0
        self._closed = False
        self._observer.watch_connections(lambda: (self._open, self._busy))

    def _client(self) -> aiosmtplib.SMTP:
        config = self._config
        context = (
            ssl.create_default_context(cafile=config.ca_file) if config.security != "none" else None
        )
        return aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            username=config.username,
            password=config.password,
            use_tls=config.security == "tls",
            start_tls=config.security == "starttls",
            tls_context=context,
            timeout=config.timeout,
        )

    async def _connect(self) -> _Connection:
        """aiosmtplib greets, says EHLO, STARTTLS and AUTH; then our protocol takes over."""
        client = self._client()
        try:
            await client.connect()
            # connect() greets lazily when there is no STARTTLS or AUTH to do.
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Even a 5xx greeting or refused login is the operator's problem, not the
            # mail's: retry it rather than dead-letter every message.
            raise TransientSmtpError(f"connect: {type(exc).__name__}: {_short(str(exc))}") from exc
        pipelining = client.supports_extension("pipelining")
        self._open += 1
        if not self._config.pipelining:
            return _Connection(client, None, pipelining)
        if client.transport is None:
            raise TransientSmtpError("connect: no transport")
        protocol = TransactionProtocol()
        protocol.adopt(client.transport)
        return _Connection(client, protocol, pipelining)

    async def _take(self) -> _Connection:
        """An idle connection, or a new one, under one of the pool's slots."""
        await self._slots.acquire()
        self._busy += 1
        try:
            while self._idle:
                idle = self._idle.pop()
                if not idle.closed:
                    return idle
                self._drop(idle)  # the server hung up while it sat idle
            return await self._connect()
        except BaseException:
            self._give_back(None)
            raise

    def _give_back(self, connection: _Connection | None) -> None:
        """The slot, and the connection unless it was dropped (None)."""
        self._busy -= 1
        if connection is not None and not self._closed:
            self._idle.append(connection)
        self._slots.release()

    def _drop(self, connection: _Connection) -> None:
        self._open -= 1
        with contextlib.suppress(Exception):
            if connection.protocol is not None:
                connection.protocol.close()
            else:
                connection.client.close()

    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Callable[[], bool] | None = None,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        started = time.perf_counter()
        outcome = "error"
        try:
            connection = await self._take()
            keep: _Connection | None = connection
            try:
                if ready is not None:
                    try:
                        await ready()
                    except BaseException:
                        outcome = "withheld"  # not this instance's to send now: none written
                        raise
                try:
                    await self._transact(connection, sender, recipient, message, may_finish)
                except BaseException:
                    # Mid-pipeline after a refusal, or broken: start afresh next time.
                    self._drop(connection)
                    keep = None
                    raise
            finally:
                self._give_back(keep)
            outcome = "accepted"
        except PermanentSmtpError:
            outcome = "permanent"
            raise
        except TransientSmtpError:
            outcome = "transient"
            raise
        except Withheld:
            outcome = "withheld"
            raise
        finally:
            self._observer.send_finished(time.perf_counter() - started, outcome)

    async def _transact(
        self,
        connection: _Connection,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Callable[[], bool] | None,
    ) -> None:
        try:
            async with asyncio.timeout(self._config.timeout):
                if connection.protocol is None:
                    await _plain_transaction(
                        connection.client, sender, recipient, message, may_finish
                    )
                else:
                    await send_transaction(
                        connection.protocol,
                        sender,
                        recipient,
                        dot_stuff(message),
                        connection.pipelining,
                        may_finish,
                    )
        except SmtpReplyError as exc:
            raise _classify(exc.code, exc.text) from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            raise _classify(refused.code, refused.message) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(exc.code, exc.message) from exc
        except aiosmtplib.SMTPException as exc:
            raise TransientSmtpError(f"{type(exc).__name__}: {_short(str(exc))}") from exc
        except ValueError as exc:
            # An address that cannot be put on the wire safely.
            raise PermanentSmtpError(553, _short(str(exc))) from exc
        except (OSError, TimeoutError) as exc:
            raise TransientSmtpError(f"{type(exc).__name__}: {_short(str(exc))}") from exc

    async def ping(self) -> bool:
        """Whether the server answers a fresh connection with a greeting and NOOP."""
        client = self._client()
        try:
            await client.connect(timeout=min(5.0, self._config.timeout))
            await client.noop()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        finally:
            with contextlib.suppress(Exception):
                client.close()
        return True

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._drop(connection)


async def _plain_transaction(
    client: aiosmtplib.SMTP,
    sender: str,
    recipient: str,
    message: bytes,
    may_finish: Callable[[], bool] | None,
) -> None:
    """One mail through aiosmtplib itself (NOTIFY_SMTP_PIPELINING=false).

    aiosmtplib offers no hook before the end of DATA, so `may_finish` is asked just before
    the transaction starts: a looser check than the fast path's.
    """
    if may_finish is not None and not may_finish():
        raise Withheld
    if isinstance(message, Payload):
        message = undo_dot_stuff(message)  # aiosmtplib stuffs it again
    errors, _ = await client.sendmail(sender, [recipient], message)
    if recipient in errors:
        code, text = errors[recipient]
        raise SmtpReplyError(code, text)


def _classify(code: int, message: str) -> Exception:
    # RFC 5321 §4.2.1: 5yz is a permanent negative completion, 4yz a transient one.
    if SMTPStatus.unrecognized_command <= code < 600:
        return PermanentSmtpError(code, _short(message))
    return TransientSmtpError(f"{code} {_short(message)}", code)
