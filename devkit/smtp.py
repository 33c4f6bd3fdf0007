"""SMTP servers for dev and tests: a capture into .eml files, and a recorder that fails on cue."""

from __future__ import annotations

import asyncio
import email
import email.parser
import email.policy
import json
import re
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from aiosmtpd.controller import Controller

from devkit.process import free_port

# --- capture (notifier dev) ----------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]+")


class _CaptureHandler:
    """aiosmtpd handler: each mail to `<n>-<message-id>.eml`, envelope in a `.json` beside it."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self._lock = threading.Lock()
        # Go on from the highest number already there, so a restart does not overwrite mail.
        numbers = (re.match(r"(\d+)-", p.name) for p in maildir.glob("*.eml"))
        self._n = max((int(m[1]) for m in numbers if m), default=0)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        mid = _UNSAFE.sub("_", str(headers.get("Message-ID", "")).strip().strip("<>"))[:120]
        with self._lock:
            self._n += 1
            stem = f"{self._n}-{mid or 'no-message-id'}"
        envelope_info = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "peer": str(session.peer),
            "received": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (self.maildir / f"{stem}.json").write_text(json.dumps(envelope_info, indent=2) + "\n")
        # Write then rename, so whoever watches for *.eml never reads half a message.
        tmp = self.maildir / f".{stem}.tmp"
        tmp.write_bytes(raw)
        tmp.rename(self.maildir / f"{stem}.eml")
        return "250 OK captured"


class Stoppable(Protocol):
    """What run_smtp_capture returns (an aiosmtpd Controller)."""

    def stop(self) -> None: ...


def run_smtp_capture(host: str, port: int, maildir: Path) -> Stoppable:
    """Start an SMTP server that stores every message in maildir; returns its Controller."""
    maildir.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        _CaptureHandler(maildir), hostname=host, port=port, enable_SMTPUTF8=True
    )
    controller.start()
    return controller


# --- recorder (tests, fault suite) --------------------------------------------------------


class Received(NamedTuple):
    """One accepted message: envelope sender, envelope recipients, the bytes of DATA."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class SmtpRecorder:
    """aiosmtpd server (own thread) on 127.0.0.1 that records mail and fails on request.

    `fail_rcpt(addr)` refuses that recipient at RCPT until `clear_faults()`;
    `fail_next_rcpt(n)` refuses the next n RCPT commands, whatever the address;
    `fail_next(n)` refuses the next n messages at the end of DATA. `stop()`/`start()` take
    the server down and bring it back on the same port. `hold()` makes every RCPT wait
    (unanswered, so no mail can reach its end of DATA) until `release()`; `held_peers`
    names the client connections waiting there. EHLO offers PIPELINING unless
    `pipelining=False`, so the service's fast path is what tests exercise.

    Pacing, like a real MTA: each DATA waits `delay` seconds before the message is
    accepted (recorded), then `reply_delay` more before the 250 goes out. A client killed
    in that second window leaves a message the server accepted but the client never saw
    accepted (the one duplicate SMTP allows).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay: float = 0.0,
        reply_delay: float = 0.0,
        pipelining: bool = True,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.messages: list[Received] = []
        self.data_attempts = 0  # DATA commands seen, refused ones included
        self.rcpt_refusals = 0  # RCPT commands refused on request
        self.delay = delay  # seconds each DATA waits before it is accepted (a slow server)
        self.reply_delay = reply_delay  # seconds more before an acceptance is answered
        # Offered in EHLO, as Postfix does: the service's fast path pipelines across mails.
        # (aiosmtpd reads commands one by one, so it copes with a client that pipelines.)
        self.pipelining = pipelining
        self._lock = threading.Lock()
        self._rcpt_faults: dict[str, str] = {}
        self._next_rcpt_faults: list[str] = []
        self._data_faults: list[str] = []
        self._controller: Controller | None = None
        self._holding = threading.Event()
        self._held: set[tuple[str, int]] = set()

    # -- control (called from the test) --

    def fail_rcpt(
        self, addr: str, code: int = 550, text: str = "5.1.1 mailbox unavailable"
    ) -> None:
        with self._lock:
            self._rcpt_faults[addr.lower()] = f"{code} {text}"

    def fail_next_rcpt(self, n: int, code: int = 451, text: str = "4.2.1 busy") -> None:
        with self._lock:
            self._next_rcpt_faults.extend([f"{code} {text}"] * n)

    def fail_next(self, n: int, code: int = 451, text: str = "4.3.0 try again later") -> None:
        with self._lock:
            self._data_faults.extend([f"{code} {text}"] * n)

    def hold(self) -> None:
        """From now on, RCPT commands wait unanswered until release()."""
        self._holding.set()

    def release(self) -> None:
        self._holding.clear()

    @property
    def held_peers(self) -> set[tuple[str, int]]:
        """(host, port) of each client connection whose RCPT waits in hold() now."""
        with self._lock:
            return set(self._held)

    def clear_faults(self) -> None:
        with self._lock:
            self._rcpt_faults.clear()
            self._next_rcpt_faults.clear()
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

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self._holding.is_set():
            peer = tuple(session.peer[:2])
            with self._lock:
                self._held.add(peer)
            try:
                # Set and cleared from the test's thread: an asyncio.Event is one loop's.
                while self._holding.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            finally:
                with self._lock:
                    self._held.discard(peer)
        with self._lock:
            refusal = self._rcpt_faults.get(address.lower())
            if refusal is None and self._next_rcpt_faults:
                refusal = self._next_rcpt_faults.pop(0)
            if refusal:
                self.rcpt_refusals += 1
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
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        return "250 OK queued"
