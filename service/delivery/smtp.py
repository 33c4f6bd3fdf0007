"""A bounded pool of reused SMTP connections that sorts failures into transient and permanent."""

from __future__ import annotations

import asyncio
import collections
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
    END_OF_DATA,
    Payload,
    SmtpReplyError,
    TransactionProtocol,
    Withheld,
    dot_stuff,
    envelope,
    expect_envelope,
    send_transaction,
    undo_dot_stuff,
    write_all_but_last,
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


@dataclass(eq=False, slots=True)
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


@dataclass(eq=False, slots=True)
class _Job:
    """One mail waiting for a connection, or on one."""

    sender: str
    recipient: str
    message: bytes
    may_finish: Callable[[], bool] | None
    ready: Callable[[], Awaitable[None]] | None
    done: asyncio.Future[None]

    @property
    def abandoned(self) -> bool:
        """Its sender stopped waiting (cancelled), or it is settled already."""
        return self.done.done()

    def settle(self, error: BaseException | None = None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)


class SmtpPool:
    """Up to `pool_size` connections, each served by its own task from one queue of mails.

    On a connection that offers PIPELINING (our fast path), a mail's end of DATA goes out
    in one write with the next mail's MAIL, RCPT and DATA (RFC 2920 §3.1: message content
    may open a group), so a busy connection waits one round trip per mail, not two. The
    next mail's `ready()` is awaited before that write, and the current mail's
    `may_finish()` right before it, with nothing awaited in between. A mail whose envelope
    went ahead on a connection that then fails goes back to the head of the queue: without
    its own content and final dot, the server delivers nothing of it.
    """

    def __init__(self, config: SmtpConfig, observer: PoolObserver | None = None) -> None:
        self._config = config
        self._observer: PoolObserver = observer or _NoObserver()
        self._queue: collections.deque[_Job] = collections.deque()
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._runners: set[asyncio.Task[None]] = set()
        self._connections: set[_Connection] = set()
        self._busy = 0
        self._closed = False
        self._observer.watch_connections(lambda: (len(self._connections), self._busy))

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
            with contextlib.suppress(Exception):
                client.close()
            raise TransientSmtpError(f"connect: {type(exc).__name__}: {_short(str(exc))}") from exc
        pipelining = client.supports_extension("pipelining")
        if not self._config.pipelining:
            connection = _Connection(client, None, pipelining)
        elif client.transport is None:
            raise TransientSmtpError("connect: no transport")
        else:
            protocol = TransactionProtocol()
            protocol.adopt(client.transport)
            connection = _Connection(client, protocol, pipelining)
        self._connections.add(connection)
        return connection

    def _drop(self, connection: _Connection) -> None:
        self._connections.discard(connection)
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
        if self._closed:
            raise TransientSmtpError("the SMTP pool is closed")
        job = _Job(
            sender,
            recipient,
            message,
            may_finish,
            ready,
            asyncio.get_running_loop().create_future(),
        )
        self._queue.append(job)
        self._wake()
        try:
            await job.done
            outcome = "accepted"
        except PermanentSmtpError:
            outcome = "permanent"
            raise
        except TransientSmtpError:
            outcome = "transient"
            raise
        except Exception:
            outcome = "withheld"  # Withheld, or what `ready()` raised: nothing was written
            raise
        finally:
            self._observer.send_finished(time.perf_counter() - started, outcome)

    def _wake(self) -> None:
        """An idle runner for the queue's head, or a new one while the pool has room."""
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if len(self._runners) < self._config.pool_size:
            runner = asyncio.create_task(self._run())
            self._runners.add(runner)
            runner.add_done_callback(self._runner_ended)

    def _runner_ended(self, runner: asyncio.Task[None]) -> None:
        self._runners.discard(runner)
        if self._queue and not self._closed:
            self._wake()  # it ended early (cancelled): another takes over

    def _next_nowait(self) -> _Job | None:
        while self._queue:
            job = self._queue.popleft()
            if not job.abandoned:
                return job
        return None

    async def _next(self) -> _Job | None:
        """The queue's next mail, waiting idle for one; None once the pool is closed."""
        while not self._closed:
            job = self._next_nowait()
            if job is not None:
                return job
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter
        return None

    async def _run(self) -> None:
        """One connection's task: opened on demand, kept while it works, dropped on trouble."""
        connection: _Connection | None = None
        try:
            while (job := await self._next()) is not None:
                self._busy += 1
                try:
                    if connection is not None and connection.closed:
                        self._drop(connection)  # the server hung up while it sat idle
                        connection = None
                    if connection is None:
                        try:
                            connection = await self._connect()
                        except TransientSmtpError as exc:
                            job.settle(exc)
                            continue
                    if connection.protocol is not None and connection.pipelining:
                        kept = await self._serve_pipelined(connection, connection.protocol, job)
                    else:
                        kept = await self._serve_one(connection, job)
                    if not kept:
                        connection = None
                except BaseException as exc:
                    # A fault of ours, or the pool cut short while connecting, must not
                    # leave the sender waiting for ever.
                    job.settle(exc if isinstance(exc, Exception) else _classified(exc))
                    if connection is not None:
                        self._drop(connection)
                        connection = None
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    self._busy -= 1
        finally:
            if connection is not None:
                self._drop(connection)

    async def _prepare(self, job: _Job) -> bool:
        """`job.ready()`, with this connection in hand; False (job settled) if it raised."""
        if job.ready is None:
            return True
        try:
            await job.ready()
        except Exception as exc:
            job.settle(exc)  # not this instance's to send now: none of it written
            return False
        return not job.abandoned

    async def _envelope(self, job: _Job) -> bytes | None:
        """`job`'s MAIL, RCPT and DATA once `ready()` let it go; None (job settled, nothing
        written) if it did not, or if an address cannot be written."""
        if not await self._prepare(job):
            return None
        try:
            return envelope(job.sender, job.recipient)
        except ValueError as exc:
            job.settle(_classified(exc))
            return None

    async def _serve_one(self, connection: _Connection, job: _Job) -> bool:
        """One transaction, nothing carried over; whether the connection is kept."""
        if not await self._prepare(job):
            return True
        try:
            async with asyncio.timeout(self._config.timeout):
                if connection.protocol is None:
                    await _plain_transaction(
                        connection.client, job.sender, job.recipient, job.message, job.may_finish
                    )
                else:
                    await send_transaction(
                        connection.protocol,
                        job.sender,
                        job.recipient,
                        dot_stuff(job.message),
                        job.may_finish,
                    )
        except BaseException as exc:
            # After a refusal, or broken: start afresh next time.
            self._drop(connection)
            job.settle(_classified(exc))
            if not isinstance(exc, Exception):
                raise
            return False
        job.settle()
        return True

    async def _serve_pipelined(
        self, connection: _Connection, protocol: TransactionProtocol, job: _Job
    ) -> bool:
        """`job`, then the mails it carries on this connection; whether it is kept."""
        current: _Job | None = job
        envelope_written = False
        carried: _Job | None = None
        try:
            while current is not None:
                if not envelope_written:
                    head = await self._envelope(current)
                    if head is None:
                        current = self._next_nowait()
                        continue
                    protocol.write(head)
                async with asyncio.timeout(self._config.timeout):
                    await expect_envelope(protocol)
                    last = await write_all_but_last(protocol, dot_stuff(current.message))
                carried = self._next_nowait() if not self._closed else None
                carry: bytes | None = None
                if carried is not None:
                    carry = await self._envelope(carried)
                    if carry is None:
                        carried = None
                # The fence: nothing awaited between this check and the write that ends
                # the mail.
                if current.abandoned or (
                    current.may_finish is not None and not current.may_finish()
                ):
                    protocol.abort()  # unfinished: the server discards it (§4.1.1.4)
                    current.settle(Withheld())
                    self._requeue(carried)
                    self._drop(connection)
                    return False
                protocol.write(last + END_OF_DATA + (carry or b""))
                async with asyncio.timeout(self._config.timeout):
                    code, text = await protocol.reply()
                if code // 100 != SMTPStatus.completed // 100:
                    raise SmtpReplyError(code, text)
                current.settle()
                current, carried, envelope_written = carried, None, carried is not None
        except BaseException as exc:
            self._drop(connection)
            if current is not None:
                current.settle(_classified(exc))
            self._requeue(carried)
            if not isinstance(exc, Exception):
                raise
            return False
        return True

    def _requeue(self, job: _Job | None) -> None:
        """Back to the head of the queue: its envelope may be out, but nothing more."""
        if job is None or job.abandoned:
            return
        if self._closed:
            job.settle(TransientSmtpError("the SMTP pool is closed"))
            return
        self._queue.appendleft(job)
        self._wake()

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
        """Idle connections close now, busy ones after their mail; queued mails fail."""
        self._closed = True
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
        while self._queue:
            self._queue.popleft().settle(TransientSmtpError("the SMTP pool is closed"))
        runners = set(self._runners)
        if runners:
            # Idle ones end at once; a busy one gets a moment to finish its mail.
            _, late = await asyncio.wait(runners, timeout=min(1.0, self._config.timeout))
            for runner in late:
                runner.cancel()
            if late:
                await asyncio.wait(late)


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


def _classified(exc: BaseException) -> BaseException:
    """What the sender of a mail learns from what went wrong with its transaction."""
    if isinstance(exc, (TransientSmtpError, PermanentSmtpError, Withheld)):
        return exc
    if isinstance(exc, SmtpReplyError):
        return _classify(exc.code, exc.text)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = exc.recipients[0]
        return _classify(refused.code, refused.message)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _classify(exc.code, exc.message)
    if isinstance(exc, ValueError):
        # An address that cannot be put on the wire safely.
        return PermanentSmtpError(553, _short(str(exc)))
    if isinstance(exc, (aiosmtplib.SMTPException, OSError, TimeoutError)):
        return TransientSmtpError(f"{type(exc).__name__}: {_short(str(exc))}")
    if isinstance(exc, Exception):
        return exc
    return TransientSmtpError(f"interrupted: {type(exc).__name__}")  # the pool is closing


def _classify(code: int, message: str) -> Exception:
    # RFC 5321 §4.2.1: 5yz is a permanent negative completion, 4yz a transient one.
    if SMTPStatus.unrecognized_command <= code < 600:
        return PermanentSmtpError(code, _short(message))
    return TransientSmtpError(f"{code} {_short(message)}", code)
