"""A bounded pool of reused SMTP connections that sorts failures into transient and permanent."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

import aiosmtplib

from service.delivery.smtp_wire import (
    SmtpReplyError,
    TransactionProtocol,
    dot_stuff,
    send_transaction,
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

    async def send(self, sender: str, recipient: str, message: bytes) -> None:
        """Return once the server accepted the message, or raise one of the errors above."""
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


@dataclass(slots=True)
class _Connection:
    """A connection past EHLO/STARTTLS/AUTH, driven by our transaction protocol."""

    protocol: TransactionProtocol
    pipelining: bool


class PoolObserver(Protocol):
    """Receives pool events for metrics; the pool itself stays free of Prometheus."""

    def connections(self, open_count: int, busy_count: int) -> None: ...

    def send_finished(self, seconds: float, outcome: str) -> None: ...


class _NoObserver:
    def connections(self, open_count: int, busy_count: int) -> None:
        pass

    def send_finished(self, seconds: float, outcome: str) -> None:
        pass


def _short(message: str) -> str:
    # Server replies end up in logs and dead-letter headers: keep them one short line.
    return " ".join(message.split())[:200]


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

    @property
    def size(self) -> int:
        return self._config.pool_size

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
        if client.transport is None:
            raise TransientSmtpError("connect: no transport")
        protocol = TransactionProtocol()
        protocol.adopt(client.transport)
        self._open += 1
        return _Connection(protocol, client.supports_extension("pipelining"))

    def _report(self) -> None:
        self._observer.connections(self._open, self._busy)

    @contextlib.asynccontextmanager
    async def _lease(self) -> AsyncIterator[list[_Connection]]:
        await self._slots.acquire()
        self._busy += 1
        holder: list[_Connection] = []
        try:
            while self._idle and not holder:
                idle = self._idle.pop()
                if idle.protocol.closed:  # the server hung up while it sat idle
                    self._drop(idle)
                else:
                    holder.append(idle)
            if not holder:
                holder.append(await self._connect())
            self._report()
            yield holder
        finally:
            self._busy -= 1
            if holder and not self._closed:
                self._idle.append(holder[0])
            self._slots.release()
            self._report()

    def _drop(self, connection: _Connection) -> None:
        self._open -= 1
        with contextlib.suppress(Exception):
            connection.protocol.close()

    async def send(self, sender: str, recipient: str, message: bytes) -> None:
        started = time.perf_counter()
        outcome = "error"
        payload = dot_stuff(message)
        try:
            async with self._lease() as holder:
                connection = holder[0]
                try:
                    await self._transact(connection, sender, recipient, payload)
                except BaseException:
                    # Mid-pipeline after a refusal, or broken: start afresh next time.
                    holder.clear()
                    self._drop(connection)
                    raise
            outcome = "accepted"
        except PermanentSmtpError:
            outcome = "permanent"
            raise
        except TransientSmtpError:
            outcome = "transient"
            raise
        finally:
            self._observer.send_finished(time.perf_counter() - started, outcome)

    async def _transact(
        self, connection: _Connection, sender: str, recipient: str, payload: bytes
    ) -> None:
        try:
            async with asyncio.timeout(self._config.timeout):
                await send_transaction(
                    connection.protocol, sender, recipient, payload, connection.pipelining
                )
        except SmtpReplyError as exc:
            raise _classify(exc.code, exc.text) from exc
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
        self._report()


def _classify(code: int, message: str) -> Exception:
    if 500 <= code < 600:
        return PermanentSmtpError(code, _short(message))
    return TransientSmtpError(f"{code} {_short(message)}", code)
