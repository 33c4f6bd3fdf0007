"""Mails built in worker processes: `PooledBuilder`, the MailBuilder that spreads the work.

Rendering and MIME building hold the GIL, so a single event loop cannot overlap them with
Kafka and SMTP work. Worker processes (spawned, each with its own compiled templates) build
a chunk of notifications per call: one call per mail would cost the event loop about as
much as the work it hands off (benchmarks/README.md has the figures).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context

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
        try:
            if entry is None or _besides_thread(entry.notification) != _besides_thread(n):
                [outcome] = await self.pool.build_chunk([n])
            else:
                del self.ahead[n.key]
                outcome = (await entry.chunk)[entry.index]
                if isinstance(outcome, Built) and entry.notification != n:
                    outcome = await self._rethread(n, outcome)
        except BrokenProcessPool:
            raise WorkerLost from None
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
    """`workers` processes, each with its own MailFactory (templates, attachment cache)."""

    def __init__(self, spec: MailSpec, workers: int) -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._spec = spec
        self.workers = workers
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn, not fork: forking a process that runs an event loop and threads is unsafe.
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=get_context("spawn"),
            initializer=_start_worker,
            initargs=(self._spec, os.getpid()),
        )

    @property
    def domain(self) -> str:
        """The domain of the Message-IDs the workers write."""
        return self._spec.domain

    async def start(self) -> None:
        """Start every worker now, so the first batch does not wait for imports."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, _ready) for _ in range(self.workers))
        )

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
        """One chunk's outcomes, in order (BrokenProcessPool if its worker died); a mail
        past the chunk's room for attachments comes back `Rendered`."""
        executor = self._executor
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, _build_chunk, ns)
        except BrokenProcessPool:
            # Every pending call of a broken pool fails; the first to get here replaces it.
            if self._executor is executor:
                log.error("render worker died; starting new ones", extra={"workers": self.workers})
                self._executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


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


# The worker side: one MailFactory per process, made by the pool's initializer.
_factory: MailFactory | None = None


def _start_worker(spec: MailSpec, parent: int) -> None:
    global _factory
    _factory = spec.factory()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A parent killed with SIGKILL cannot shut its pool down: do not outlive it.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _ready() -> bool:
    return _factory is not None


def _build_chunk(ns: Sequence[Notification]) -> list[Outcome | Rendered]:
    assert _factory is not None, "worker not initialized"
    room = AHEAD_ATTACHMENT_BYTES
    outcomes: list[Outcome | Rendered] = []
    for n in ns:
        outcome, used = _factory.build_ahead(n, room)
        room -= used
        outcomes.append(outcome)
    return outcomes
