"""Mails built in worker processes: `PooledBuilder`, the MailBuilder that spreads the work.

Rendering and MIME building hold the GIL, so a single event loop cannot overlap them with
Kafka and SMTP work. Worker processes (spawned, each with its own compiled templates) build
a chunk of notifications per call: one call per mail would cost the event loop about as
much as the work it hands off (benchmarks/README.md has the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from typing import cast

from service.core.message import rethreaded
from service.core.routing import Notification
from service.delivery.build import (
    Built,
    InlineBatch,
    InlineBuilder,
    MailFactory,
    MailSpec,
    NotBuilt,
    Outcome,
    Rendered,
)
from service.delivery.smtp_wire import Payload

log = logging.getLogger("service.delivery.workers")

# Notifications per call into a worker: large enough that pickling and the round trip are
# a small share, small enough that the first mails of a large batch go out while the rest
# are still being built.
CHUNK_MAX = 64
FIRST_CHUNK = 4
# Attachment bytes a chunk's mails may hold; mails past it come back rendered and are
# given their files when sent. A batch of 1,000 mails is 19 chunks: at most 76 MiB ahead.
AHEAD_ATTACHMENT_BYTES = 4 * 1024 * 1024

Key = tuple[str, ...]


class WorkerLost(Exception):
    """A worker process died (killed, out of memory): the chunk's outcome is unknown."""


@dataclass(slots=True)
class _Ahead:
    """A notification handed to a worker, and where its outcome will be."""

    notification: Notification
    chunk: asyncio.Task[list[Outcome | Rendered]]
    index: int


@dataclass(slots=True)
class PooledBatch:
    """One Kafka batch: its mails built ahead by the workers (those past a chunk's room
    for attachments rendered ahead, then attached and assembled here when asked for)."""

    pool: WorkerPool
    inline: InlineBatch
    ahead: dict[Key, _Ahead] = field(default_factory=dict)
    chunks: list[asyncio.Task[list[Outcome | Rendered]]] = field(default_factory=list)

    async def build(self, n: Notification) -> Outcome:
        entry = self.ahead.get(n.key)
        # Two records of one activity in a batch give the same key: only the notification
        # sent ahead takes its outcome, any other goes to a worker on its own. A follow-up
        # whose parent was mailed earlier in the batch now answers that mail: the mail built
        # ahead is the same but for its threading headers, which are written again here.
        if entry is None or _besides_thread(entry.notification) != _besides_thread(n):
            [outcome] = await self.pool.build_chunk([n])
        else:
            del self.ahead[n.key]
            outcome = (await entry.chunk)[entry.index]
            if isinstance(outcome, Built) and entry.notification != n:
                outcome = await self._rethread(n, outcome)
        if isinstance(outcome, Rendered):
            return await self.inline.attach(n, outcome.mail, outcome.render_seconds)
        return outcome

    async def _rethread(self, n: Notification, built: Built) -> Outcome | Rendered:
        data = rethreaded(built.data, n, self.pool.domain)
        if data is None:
            [outcome] = await self.pool.build_chunk([n])
            return outcome
        # Only header lines changed, none starting with a dot: still dot-stuffed.
        return Built(Payload(data), built.render_seconds)

    async def rebuild(self, n: Notification, previous: NotBuilt) -> Outcome:
        return await self.inline.rebuild(n, previous)

    async def close(self) -> None:
        # Chunks nobody waited for (a record failed, or shutdown): collect them quietly.
        for task in self.chunks:
            task.cancel()
        await asyncio.gather(*self.chunks, return_exceptions=True)


class WorkerPool:
    """`workers` processes, each with its own MailFactory (templates, attachment cache).

    Each worker has a socket of its own, read and written on the event loop itself: a
    chunk goes to the worker with the fewest chunks in hand, pickled here and written as
    one frame; its outcomes come back as one frame, in the order the chunks were sent. No
    thread of this process takes part (a `ProcessPoolExecutor` pickles on a feeder thread
    and unpickles on a manager thread, which hold the GIL and wake each other and the
    loop for every chunk: benchmarks/README.md, eleventh round).

    A worker that dies fails the chunks it held with WorkerLost, and is replaced; the
    other workers' chunks are not touched.
    """

    def __init__(self, spec: MailSpec, workers: int) -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._spec = spec
        self.workers = workers
        self._live: list[_Worker] = []
        self._starting = asyncio.Lock()
        self._closed = False

    @property
    def domain(self) -> str:
        """The domain of the Message-IDs the workers write."""
        return self._spec.domain

    async def start(self) -> None:
        """Start every worker now, so the first batch does not wait for imports."""
        await self._top_up()
        await asyncio.gather(*(w.ready for w in self._live))

    def chunks(self, ns: Sequence[Notification]) -> list[Sequence[Notification]]:
        """Split a batch's notifications so every worker gets a share, CHUNK_MAX at most.

        The first chunks are small (FIRST_CHUNK, doubling from one to the next), so the
        batch's first mails go out while the rest is still being built.
        """
        size = min(CHUNK_MAX, max(1, -(-len(ns) // self.workers)))
        out: list[Sequence[Notification]] = []
        start, step = 0, min(FIRST_CHUNK, size)
        while start < len(ns):
            out.append(ns[start : start + step])
            start, step = start + step, min(size, step * 2)
        return out

    async def build_chunk(self, ns: Sequence[Notification]) -> list[Outcome | Rendered]:
        """One chunk's outcomes, in order (WorkerLost if its worker died); a mail past the
        chunk's room for attachments comes back `Rendered`."""
        if len(self._live) < self.workers:
            await self._top_up()
        if not self._live:  # closed: close() empties it and _top_up adds none
            raise WorkerLost("the pool is closed")
        return await min(self._live, key=_load).submit(ns)

    async def _top_up(self) -> None:
        async with self._starting:
            while len(self._live) < self.workers and not self._closed:
                worker = await self._start_one()
                if worker.gone:  # at once: it cannot start (what would another do?)
                    raise WorkerLost("a render worker exited as it started")
                self._live.append(worker)

    async def _start_one(self) -> _Worker:
        ours, theirs = socket.socketpair()
        process = _CONTEXT.Process(
            target=_serve, args=(theirs, self._spec), name="render-worker", daemon=True
        )
        try:
            process.start()
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        worker = _Worker(process, ours, loop.create_future(), self._lost)
        await loop.create_unix_connection(lambda: worker, sock=ours)
        return worker

    def _lost(self, worker: _Worker) -> None:
        if worker in self._live:
            self._live.remove(worker)
            if not self._closed:
                log.error("render worker died; starting a new one", extra={"workers": self.workers})
        worker.process.join(0)  # reap it if it is gone already; the next start reaps the rest

    def close(self) -> None:
        self._closed = True
        workers, self._live = self._live, []
        for w in workers:
            w.hang_up()
        for w in workers:
            w.process.join(5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)


_CONTEXT = get_context("spawn")  # not fork: forking a process with an event loop and threads
_FRAME = struct.Struct("!I")


def _load(worker: _Worker) -> int:
    return len(worker.pending)


class _Worker(asyncio.Protocol):
    """The event loop's end of one worker's socket: frames out, frames in, in order."""

    def __init__(
        self,
        process: BaseProcess,
        sock: socket.socket,
        ready: asyncio.Future[None],
        lost: Callable[[_Worker], None],
    ) -> None:
        self.process = process
        self.sock = sock
        self.ready = ready
        self.pending: deque[asyncio.Future[list[Outcome | Rendered]]] = deque()
        self._lost = lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    async def submit(self, ns: Sequence[Notification]) -> list[Outcome | Rendered]:
        if self.gone or self._transport is None or self._transport.is_closing():
            raise WorkerLost("render worker gone")
        data = pickle.dumps(list(ns), pickle.HIGHEST_PROTOCOL)
        future: asyncio.Future[list[Outcome | Rendered]] = self.ready.get_loop().create_future()
        self.pending.append(future)
        self._transport.writelines((_FRAME.pack(len(data)), data))
        return await future

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buffer)
            end = _FRAME.size + size
            if len(buffer) < end:
                return
            # The worker is this process's own child, spawned with the socket's other end.
            with memoryview(buffer) as view, view[_FRAME.size : end] as frame:
                reply = pickle.loads(frame)  # noqa: S301
            del buffer[:end]
            self._answer(reply)

    def _answer(self, reply: tuple[str, object]) -> None:
        what, value = reply
        if what == "ready":
            if not self.ready.done():
                self.ready.set_result(None)
            return
        future = self.pending.popleft()
        if future.done():  # its caller was cancelled
            return
        if what == "done":
            future.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            future.set_exception(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        for future in self.pending:
            if not future.done():
                future.set_exception(WorkerLost("render worker died"))
        self.pending.clear()
        if not self.ready.done():
            self.ready.set_exception(WorkerLost("render worker died before it was ready"))
            self.ready.exception()  # retrieved: a pool that never started raises nothing
        self._lost(self)

    def hang_up(self) -> None:
        """Close the socket now: the worker reads its end and exits."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self._transport is not None:
            self._transport.close()


class PooledBuilder:
    """The MailBuilder that hands a batch's mails to a WorkerPool: built there, or, past a
    chunk's room for attachments, rendered there and given their files in this process
    just before they are sent."""

    def __init__(self, pool: WorkerPool, inline: InlineBuilder) -> None:
        self.pool = pool
        self.inline = inline

    async def start(self) -> None:
        await self.pool.start()

    def batch(self, ahead: Sequence[Notification]) -> PooledBatch:
        """Send the mails to the workers, in order, each key once."""
        batch = PooledBatch(self.pool, self.inline.batch(()))
        todo: list[Notification] = []
        seen: set[Key] = set()
        for n in ahead:
            if n.key not in seen:
                seen.add(n.key)
                todo.append(n)
        for chunk in self.pool.chunks(todo):
            task = asyncio.create_task(self.pool.build_chunk(chunk))
            batch.chunks.append(task)
            for i, n in enumerate(chunk):
                batch.ahead[n.key] = _Ahead(n, task, i)
        return batch

    def close(self) -> None:
        self.pool.close()
        self.inline.close()


def _besides_thread(n: Notification) -> Notification:
    return n.evolve(in_reply_to=None) if n.in_reply_to is not None else n


# The worker side: one MailFactory per process, made when it starts.
_factory: MailFactory | None = None


def _serve(sock: socket.socket, spec: MailSpec) -> None:
    """A worker's life: build each chunk that arrives, until its socket closes (the pool
    closed, or the service died: then the kernel closed it), and exit."""
    global _factory
    # Ctrl-C reaches the whole process group: the service stops on it and closes the
    # pool, so a worker does not die under a chunk first. (SIGTERM still ends it: at exit,
    # multiprocessing terminates the daemonic children that are left.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _factory = spec.factory()
    frames = sock.makefile("rb")

    def reply(what: str, value: object) -> None:
        data = pickle.dumps((what, value), pickle.HIGHEST_PROTOCOL)
        sock.sendall(_FRAME.pack(len(data)) + data)

    try:
        reply("ready", None)
        while len(header := frames.read(_FRAME.size)) == _FRAME.size:
            size = _FRAME.unpack(header)[0]
            if len(data := frames.read(size)) < size:
                break
            ns = pickle.loads(data)  # noqa: S301 (from the parent that spawned this process)
            try:
                outcomes = _build_chunk(ns)
            except Exception as exc:  # a bug: its caller gets it, as from a function call
                reply("failed", _sendable(exc))
            else:
                reply("done", outcomes)
    except OSError:  # the other end is gone
        pass
    os._exit(0)


def _sendable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 (its own bytes)
    except Exception:
        return RuntimeError(f"{type(exc).__name__} in a render worker")
    return exc


def _build_chunk(ns: Sequence[Notification]) -> list[Outcome | Rendered]:
    assert _factory is not None, "worker not initialized"
    room = AHEAD_ATTACHMENT_BYTES
    outcomes: list[Outcome | Rendered] = []
    for n in ns:
        outcome, used = _factory.build_ahead(n, room)
        room -= used
        outcomes.append(outcome)
    return outcomes
