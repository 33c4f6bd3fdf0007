"""Notification → mail bytes: one `build` interface, built inline or by worker processes.

A mail is rendered (Jinja, CSS inlining), given its attachments and assembled as MIME.
`MailFactory` does that for one notification. A `MailBuilder` hands out one `MailBatch` per
Kafka batch, whose `build(n)` gives the outcome for `n`:
- `InlineBuilder` builds in this process; attachment files are read and encoded on a
  thread of their own, off the event loop.
- `PooledBuilder` (in `service.delivery.workers`) builds the batch's mails ahead in worker
  processes, a chunk per call, and looks them up by notification key. A chunk holds at
  most a few MiB of attachments; mails past that are only rendered ahead (`Rendered`),
  their files attached and the MIME assembled inline just before they are sent, so what
  a batch holds in memory stays bounded.

A missing attachment may still be uploaded: its `NotBuilt` keeps the rendered mail, and
`rebuild` retries only the attachments and the MIME, without rendering again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from service.core.calendar import calendar_attachment
from service.core.failures import Failure, Stage
from service.core.message import Attachment, build_message
from service.core.mime import AddressError
from service.core.render import RenderedMail, Renderer, RenderError
from service.core.routing import Notification
from service.delivery.attachments import (
    AttachmentMissing,
    AttachmentRefused,
    AttachmentStore,
    DirectoryAttachmentStore,
)
from service.delivery.smtp_wire import Payload


@dataclass(frozen=True, slots=True)
class Built:
    """The message, and how long its templates took to render."""

    data: Payload
    """On the wire's terms already (dot-stuffed), so a worker does it, not the event loop."""
    render_seconds: float


@dataclass(frozen=True, slots=True)
class NotBuilt:
    """Why a message could not be built; `missing`: an attachment may still arrive.

    `rendered` keeps the templates' output when only the attachments failed, so a retry
    does not render again.
    """

    failure: Failure
    missing: bool = False
    rendered: RenderedMail | None = None
    render_seconds: float = 0.0


Outcome = Built | NotBuilt


@dataclass(frozen=True, slots=True)
class Rendered:
    """A mail's templates' output, waiting for its attachments (a worker renders ahead)."""

    mail: RenderedMail
    render_seconds: float


@dataclass(frozen=True, slots=True)
class MailSpec:
    """Everything a process needs to build mails (picklable, for worker processes)."""

    templates_dir: Path
    attachments_dir: Path
    max_attachment_bytes: int
    max_mail_bytes: int
    sender: str
    reply_to: str | None
    domain: str
    zone: dt.tzinfo = dt.UTC  # NOTIFY_TIMEZONE, for the .ics of staff mail

    def store(self) -> DirectoryAttachmentStore:
        return DirectoryAttachmentStore(
            self.attachments_dir, self.max_attachment_bytes, self.max_mail_bytes
        )

    def factory(self) -> MailFactory:
        return MailFactory(Renderer(self.templates_dir), self.store(), self)


class MailFactory:
    """Render, attach, assemble: one notification's message, or why not (no event loop)."""

    def __init__(self, renderer: Renderer, store: AttachmentStore, spec: MailSpec) -> None:
        self._renderer = renderer
        self._store = store
        self._spec = spec

    def build(self, n: Notification) -> Outcome:
        """The whole mail, in the calling thread."""
        outcome, _ = self.build_ahead(n, room=None)
        assert not isinstance(outcome, Rendered)  # no room limit: always assembled
        return outcome

    def build_ahead(self, n: Notification, room: int | None) -> tuple[Outcome | Rendered, int]:
        """The whole mail and the attachment bytes it holds; only its rendering (and 0)
        when its attachments are more than `room` bytes."""
        rendered = self.render(n)
        if isinstance(rendered, NotBuilt):
            return rendered, 0
        mail, seconds = rendered
        try:
            attachments = self._store.load(n.attachments)
        except (AttachmentMissing, AttachmentRefused) as exc:
            return _not_attached(exc, mail, seconds), 0
        size = sum(len(item.data) for item in attachments)
        if room is not None and size > room:
            return Rendered(mail, seconds), 0
        return self.assemble(n, mail, seconds, attachments), size

    def render(self, n: Notification) -> tuple[RenderedMail, float] | NotBuilt:
        started = time.perf_counter()
        try:
            mail = self._renderer.render(n)
        except RenderError as exc:
            return NotBuilt(Failure.of(Stage.RENDER, str(exc)))
        return mail, time.perf_counter() - started

    def load(self, refs: Sequence[str]) -> list[Attachment]:
        """The referenced files; AttachmentMissing or AttachmentRefused."""
        return self._store.load(refs)

    def assemble(
        self,
        n: Notification,
        mail: RenderedMail,
        render_seconds: float,
        attachments: Sequence[Attachment],
    ) -> Outcome:
        date = datetime.now(UTC)
        calendar = calendar_attachment(
            n, zone=self._spec.zone, domain=self._spec.domain, stamp=date
        )
        if calendar is not None:
            attachments = [*attachments, calendar]
        try:
            data = build_message(
                n,
                mail,
                sender=self._spec.sender,
                reply_to=self._spec.reply_to,
                domain=self._spec.domain,
                attachments=attachments,
                date=date,
                dot_stuffed=True,
            )
        except AddressError as exc:
            return NotBuilt(Failure.of(Stage.ADDRESS, str(exc)))
        return Built(Payload(data), render_seconds)


def _not_attached(
    exc: AttachmentMissing | AttachmentRefused, mail: RenderedMail, seconds: float
) -> NotBuilt:
    missing = isinstance(exc, AttachmentMissing)
    return NotBuilt(Failure.of(Stage.ATTACHMENT, str(exc)), missing, mail, seconds)


class MailBatch(Protocol):
    """The mails of one Kafka batch."""

    async def build(self, n: Notification) -> Outcome:
        """`n`'s message, or why it cannot be built (WorkerLost if a worker died)."""
        ...

    async def rebuild(self, n: Notification, previous: NotBuilt) -> Outcome:
        """Try a mail whose attachment was missing again, without rendering it again."""
        ...

    async def close(self) -> None:
        """Drop whatever was built ahead and not asked for."""
        ...


class MailBuilder(Protocol):
    """Hands out one MailBatch per Kafka batch; `ahead` are the mails it will be asked for."""

    def batch(self, ahead: Sequence[Notification]) -> MailBatch: ...

    async def start(self) -> None: ...

    def close(self) -> None: ...


class InlineBatch:
    """Builds in this process: templates and MIME here, files on the loader thread."""

    def __init__(self, factory: MailFactory, loader: ThreadPoolExecutor) -> None:
        self._factory = factory
        self._loader = loader

    async def build(self, n: Notification) -> Outcome:
        rendered = self._factory.render(n)
        if isinstance(rendered, NotBuilt):
            return rendered
        mail, seconds = rendered
        return await self.attach(n, mail, seconds)

    async def rebuild(self, n: Notification, previous: NotBuilt) -> Outcome:
        if previous.rendered is None:
            return await self.build(n)
        return await self.attach(n, previous.rendered, previous.render_seconds)

    async def attach(self, n: Notification, mail: RenderedMail, seconds: float) -> Outcome:
        """A rendered mail with its files (read on the loader thread), assembled."""
        attachments: list[Attachment] = []
        if n.attachments:
            loop = asyncio.get_running_loop()
            try:
                attachments = await loop.run_in_executor(
                    self._loader, self._factory.load, n.attachments
                )
            except (AttachmentMissing, AttachmentRefused) as exc:
                return _not_attached(exc, mail, seconds)
        return self._factory.assemble(n, mail, seconds, attachments)

    async def close(self) -> None:
        pass


class InlineBuilder:
    """Every mail built in this process (NOTIFY_RENDER_WORKERS=0, previews, tests)."""

    def __init__(self, factory: MailFactory) -> None:
        self.factory = factory
        # One thread: the store's file cache is not shared between threads.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attachments")

    def batch(self, ahead: Sequence[Notification]) -> InlineBatch:
        return InlineBatch(self.factory, self._loader)

    async def start(self) -> None:
        pass

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
