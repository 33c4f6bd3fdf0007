"""Notification → mail bytes (render, attach, build), in this process or in worker processes.

Rendering (Jinja, CSS inlining) and MIME building are about half of the CPU a mail costs
and hold the GIL, so a single event loop cannot overlap them with Kafka and SMTP work.
`PreparePool` runs them in worker processes, a chunk of notifications per call: one
call per mail would cost the event loop about as much as the work it hands off. (The
dispatcher sends it mails without attachments only; see `Dispatcher._submit`.)
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
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path

from service.core.message import build_message
from service.core.mime import AddressError
from service.core.render import Renderer, RenderError
from service.core.routing import Notification
from service.delivery.attachments import (
    AttachmentMissing,
    AttachmentRefused,
    AttachmentStore,
    DirectoryAttachmentStore,
)

log = logging.getLogger("service.delivery.prepare")

# Notifications per call into a worker: large enough that pickling and the round trip are
# a small share (11 µs a mail at 50, against about 150 µs at 1), small enough that the
# first mails of a large batch go out while the rest are still being built.
CHUNK_MAX = 64


@dataclass(frozen=True, slots=True)
class Prepared:
    """The message, and how long its templates took to render."""

    data: bytes
    render_seconds: float


@dataclass(frozen=True, slots=True)
class NotPrepared:
    """Why a message could not be built; `missing`: an attachment may still arrive."""

    stage: str  # render | attachment | address: the x-error-stage of the dead letter
    reason: str
    missing: bool = False


Outcome = Prepared | NotPrepared


class WorkerLost(Exception):
    """A worker process died (killed, out of memory): the chunk's outcome is unknown."""


@dataclass(frozen=True, slots=True)
class PreparerSpec:
    """Everything a process needs to build its own Preparer (picklable, for workers)."""

    templates_dir: Path
    attachments_dir: Path
    max_attachment_bytes: int
    max_mail_bytes: int
    sender: str
    reply_to: str | None
    domain: str

    def store(self) -> DirectoryAttachmentStore:
        return DirectoryAttachmentStore(
            self.attachments_dir, self.max_attachment_bytes, self.max_mail_bytes
        )

    def create(self) -> Preparer:
        return Preparer(Renderer(self.templates_dir), self.store(), self)


class Preparer:
    """Render, load attachments, build: one notification's message, or why not."""

    def __init__(self, renderer: Renderer, store: AttachmentStore, spec: PreparerSpec) -> None:
        self._renderer = renderer
        self._store = store
        self._spec = spec

    def prepare(self, n: Notification) -> Outcome:
        started = time.perf_counter()
        try:
            mail = self._renderer.render(n)
            rendered = time.perf_counter() - started
            attachments = self._store.load(n.attachments)
            data = build_message(
                n,
                mail,
                sender=self._spec.sender,
                reply_to=self._spec.reply_to,
                domain=self._spec.domain,
                attachments=attachments,
                date=datetime.now(UTC),
            )
        except RenderError as exc:
            return NotPrepared("render", str(exc))
        except AttachmentMissing as exc:
            return NotPrepared("attachment", str(exc), missing=True)
        except AttachmentRefused as exc:
            return NotPrepared("attachment", str(exc))
        except AddressError as exc:
            return NotPrepared("address", str(exc))
        return Prepared(data, rendered)


class PreparePool:
    """`workers` processes, each with its own Preparer (templates, attachment cache)."""

    def __init__(self, spec: PreparerSpec, workers: int) -> None:
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

    async def start(self) -> None:
        """Start every worker now, so the first batch does not wait for imports."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, _ready) for _ in range(self.workers))
        )

    def chunks(self, ns: Sequence[Notification]) -> list[Sequence[Notification]]:
        """Split a batch's notifications so every worker gets a share, CHUNK_MAX at most."""
        size = min(CHUNK_MAX, max(1, -(-len(ns) // self.workers)))
        return [ns[i : i + size] for i in range(0, len(ns), size)]

    async def prepare(self, ns: Sequence[Notification]) -> list[Outcome]:
        """One chunk's outcomes, in order; WorkerLost if its worker died."""
        executor = self._executor
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, _prepare_chunk, ns)
        except BrokenProcessPool:
            # Every pending call of a broken pool fails; the first to get here replaces it.
            if self._executor is executor:
                log.error("render worker died; starting new ones", extra={"workers": self.workers})
                self._executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise WorkerLost from None

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# The worker side: one Preparer per process, made by the pool's initializer.
_preparer: Preparer | None = None


def _start_worker(spec: PreparerSpec, parent: int) -> None:
    global _preparer
    _preparer = spec.create()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A parent killed with SIGKILL cannot shut its pool down: do not outlive it.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _ready() -> bool:
    return _preparer is not None


def _prepare_chunk(ns: Sequence[Notification]) -> list[Outcome]:
    assert _preparer is not None, "worker not initialized"
    return [_preparer.prepare(n) for n in ns]
