"""(a) The ceiling: aiosmtplib sending pre-built message bytes over `connections` connections.

No Kafka, no rendering, no MIME building, no ledger: the fastest a Python asyncio SMTP
client can hand these very messages to the server. The service can approach it, never
beat it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib

from service.core.message import build_message
from service.core.render import Renderer
from service.core.routing import Notification
from service.delivery.attachments import DirectoryAttachmentStore
from service.runtime.settings import default_templates_dir


@dataclass(frozen=True, slots=True)
class CeilingResult:
    messages: int
    seconds: float
    cpu_seconds: float
    connections: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def prebuild(
    notes: Sequence[Notification], attachments_dir: Path, *, limit: int = 2000
) -> list[tuple[str, bytes]]:
    """(recipient, bytes) of the first `limit` notifications, built as the service builds them."""
    renderer = Renderer(default_templates_dir())
    store = DirectoryAttachmentStore(attachments_dir, 10 << 20, 25 << 20)
    out = []
    for n in notes[:limit]:
        files = store.load(n.attachments)
        data = build_message(
            n,
            renderer.render(n),
            sender="Helpdesk <helpdesk@helpdesk.test>",
            reply_to="support@helpdesk.test",
            domain="helpdesk.test",
            attachments=files,
            date=datetime.now(UTC),
        )
        out.append((n.recipient.email, data))
    return out


async def run_ceiling(
    port: int, messages: Sequence[tuple[str, bytes]], total: int, connections: int
) -> CeilingResult:
    """Send `total` messages (cycling through `messages`) over `connections` connections."""
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port) for _ in range(connections)]
    await asyncio.gather(*(c.connect() for c in clients))
    next_index = 0

    async def worker(client: aiosmtplib.SMTP) -> None:
        nonlocal next_index
        while next_index < total:
            recipient, data = messages[next_index % len(messages)]
            next_index += 1
            await client.sendmail("helpdesk@helpdesk.test", [recipient], data)

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
    return CeilingResult(total, seconds, cpu, connections)


@dataclass(frozen=True, slots=True)
class SourceResult:
    messages: int
    seconds: float
    sessions: int
    message_bytes: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


SMTP_SOURCE = "/usr/sbin/smtp-source"


def smtp_source_binary() -> str:
    found = shutil.which("smtp-source") or (SMTP_SOURCE if Path(SMTP_SOURCE).exists() else None)
    if found is None:
        raise RuntimeError(
            "smtp-source not found: apt-get install -y postfix (debconf: No configuration)"
        )
    return found


def run_smtp_source(port: int, total: int, sessions: int, message_bytes: int) -> SourceResult:
    """The physical line: Postfix's `smtp-source` (C) pushing `total` messages of about
    `message_bytes` over `sessions` connections kept open (`-d`), one recipient each."""
    command = [
        smtp_source_binary(),
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(total),
        "-l",
        str(message_bytes),
        "-f",
        "helpdesk@helpdesk.test",
        "-t",
        "someone@helpdesk.test",
        f"127.0.0.1:{port}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, timeout=600, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        error = re.sub(rb"\s+", b" ", done.stderr[-300:]).decode(errors="replace")
        raise RuntimeError(f"smtp-source exited with {done.returncode}: {error}")
    return SourceResult(total, seconds, sessions, message_bytes)
