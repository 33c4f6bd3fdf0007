"""Test helpers: Kafka topic creation and a controllable in-process SMTP server."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import threading
import time
import uuid
from email.message import EmailMessage
from typing import Any, NamedTuple

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiosmtpd.controller import Controller

from devkit.devstack import free_port

# --- Kafka ---------------------------------------------------------------------------------


def unique_topic(test_name: str) -> str:
    """A topic name no other test uses: 'test-<test name>-<random>'."""
    # Only [a-z0-9-]: Kafka refuses names that differ from another only by '.' versus '_'.
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:80]
    return f"test-{slug}-{uuid.uuid4().hex[:8]}"


async def create_topics(
    bootstrap: str,
    names: list[str],
    partitions: int = 4,
    timeout: float = 30,  # noqa: ASYNC109
) -> None:
    """Create the topics and wait until every partition has a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        errors = [(t, code, msg) for t, code, msg in response.topic_errors if code != 0]
        if errors:
            raise RuntimeError(f"create_topics failed: {errors}")
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(names)
            if all(_has_leaders(t, partitions) for t in described):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders after {timeout} s: {described}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def _has_leaders(topic: dict[str, Any], partitions: int) -> bool:
    parts = topic.get("partitions", [])
    return (
        topic.get("error_code") == 0
        and len(parts) == partitions
        and all(p.get("leader", -1) >= 0 for p in parts)
    )


# --- SMTP ----------------------------------------------------------------------------------


class Received(NamedTuple):
    """One accepted message: envelope sender, envelope recipients, the bytes of DATA."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class SmtpRecorder:
    """aiosmtpd server (own thread) on 127.0.0.1 that records mail and fails on request.

    `fail_rcpt(addr)` refuses that recipient at RCPT until `clear_faults()`; `fail_next(n)`
    refuses the next n messages at the end of DATA. `stop()`/`start()` take the server down
    and bring it back on the same port.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.messages: list[Received] = []
        self.data_attempts = 0  # DATA commands seen, refused ones included
        self.delay = 0.0  # seconds each DATA waits before its answer (a slow server)
        self._lock = threading.Lock()
        self._rcpt_faults: dict[str, str] = {}
        self._data_faults: list[str] = []
        self._controller: Controller | None = None

    # -- control (called from the test) --

    def fail_rcpt(
        self, addr: str, code: int = 550, text: str = "5.1.1 mailbox unavailable"
    ) -> None:
        with self._lock:
            self._rcpt_faults[addr.lower()] = f"{code} {text}"

    def fail_next(self, n: int, code: int = 451, text: str = "4.3.0 try again later") -> None:
        with self._lock:
            self._data_faults.extend([f"{code} {text}"] * n)

    def clear_faults(self) -> None:
        with self._lock:
            self._rcpt_faults.clear()
            self._data_faults.clear()

    def start(self) -> None:
        if self._controller is None:
            self._controller = Controller(self, hostname=self.host, port=self.port)
            self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    # A plain number is handier in tests than wrapping each call in asyncio.timeout().
    async def wait_for(self, count: int, timeout: float = 10) -> list[Received]:  # noqa: ASYNC109
        """Wait until at least count messages were accepted; returns them all."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.messages)} of {count} messages after {timeout} s")
            await asyncio.sleep(0.05)
        return list(self.messages)

    def emails(self) -> list[EmailMessage]:
        """The accepted messages, parsed."""
        return [
            email.message_from_bytes(m.data, _class=EmailMessage, policy=email.policy.default)
            for m in self.messages
        ]

    # -- aiosmtpd handler hooks (called in the server's thread) --

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self._lock:
            refusal = self._rcpt_faults.get(address.lower())
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        with self._lock:
            self.data_attempts += 1
            if self._data_faults:
                return self._data_faults.pop(0)
            self.messages.append(
                Received(envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content)
            )
        return "250 OK queued"
