"""SMTP servers for the benchmark.

`SmtpSink` runs Postfix's `smtp-sink` (C, discards mail) with running counters (`-c`)
written to a file that the harness polls every 2 ms while it waits for the service, so it
knows within a few milliseconds when the k-th mail was accepted, at no cost to the
process under test.

`python -m benchmarks.sinks --port P --out FILE` is a small asyncio SMTP server that
stamps every accepted message: one `<wall-clock time> <activity id>` line per mail (the id
taken from the Message-ID `<a.{activity}.{kind}.{hash}@domain>`), written on SIGTERM.
Used for the publish → SMTP-acceptance latency, which smtp-sink cannot tell.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from devkit.process import listening, terminate

SMTP_SINK = "/usr/sbin/smtp-sink"
_MESG = re.compile(rb"mesg=(\d+)")


def smtp_sink_binary() -> str:
    found = shutil.which("smtp-sink") or (SMTP_SINK if Path(SMTP_SINK).exists() else None)
    if found is None:
        raise RuntimeError(
            "smtp-sink not found: apt-get install -y postfix (debconf: No configuration)"
        )
    return found


class SmtpSink:
    """`smtp-sink -c` on 127.0.0.1:port; `count` is the number of messages accepted so far.

    The running counters go to a file, read only when asked (`count`, `wait_for`), so
    nothing in the harness wakes up per message while the ceiling and the naive baseline,
    which run in the harness process, are measured.
    """

    def __init__(self, port: int, counter_file: Path) -> None:
        self.port = port
        self.counter_file = counter_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._lock = threading.Lock()
        self._size = 0
        self._count = 0
        self._stamp = time.monotonic()

    def start(self) -> None:
        cmd = [smtp_sink_binary(), "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
        cmd += [f"127.0.0.1:{self.port}", "1000"]
        with self.counter_file.open("wb") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True
            )
        self._fd = os.open(self.counter_file, os.O_RDONLY)
        wait_port(self.port, 10)

    def _poll(self) -> None:
        """Read the newest counter line if the file grew (caller holds the lock)."""
        size = os.fstat(self._fd).st_size
        if size == self._size:
            return
        now = time.monotonic()
        tail = os.pread(self._fd, 96, max(0, size - 96))
        self._size = size
        found = _MESG.findall(tail)
        if found and int(found[-1]) != self._count:
            self._count = int(found[-1])
            self._stamp = now

    @property
    def count(self) -> int:
        with self._lock:
            self._poll()
            return self._count

    def wait_for(self, target: int, timeout: float, interval: float = 0.002) -> tuple[int, float]:
        """Poll until `target` messages were accepted (or timeout); (count, when first seen)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._poll()
                if self._count >= target or time.monotonic() > deadline:
                    return self._count, self._stamp
            time.sleep(interval)

    def wait_first(self, base: int, timeout: float) -> float | None:
        """The time the first message after `base` was accepted."""
        count, stamp = self.wait_for(base + 1, timeout)
        return stamp if count > base else None

    def stop(self) -> None:
        terminate(self._proc, 5)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class StampingSink:
    """The stamping server as a child process; `stamps()` after `stop()`."""

    def __init__(self, port: int, out: Path) -> None:
        self.port = port
        self.out = out
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.sinks",
                "--port",
                str(self.port),
                "--out",
                str(self.out),
            ],
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
        wait_port(self.port, 15)

    def stop(self) -> None:
        terminate(self._proc, 10)

    def stamps(self) -> list[tuple[float, str]]:
        out = []
        for line in self.out.read_text().splitlines():
            at, _, activity = line.partition(" ")
            out.append((float(at), activity))
        return out


# --- the stamping server ---------------------------------------------------------------

_MSGID = re.compile(rb"\r\nMessage-ID: <a\.([^.>]+)\.", re.IGNORECASE)


class _Session(asyncio.Protocol):
    def __init__(self, stamps: list[tuple[float, bytes]]) -> None:
        self.stamps = stamps
        self.buf = b""
        self.data: list[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 stamp ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        assert self.transport is not None
        self.buf += chunk
        while True:
            if self.data is not None:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    # Keep a tail that could be the start of the terminator.
                    self.data.append(self.buf[:-4])
                    self.buf = self.buf[-4:]
                    return
                self.data.append(self.buf[: end + 2])
                self.buf = self.buf[end + 5 :]
                now = time.time()
                found = _MSGID.search(b"\r\n" + b"".join(self.data))
                self.stamps.append((now, found[1] if found else b"?"))
                self.data = None
                self.transport.write(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return
            line, self.buf = self.buf[:line_end], self.buf[line_end + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-stamp\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n")
            elif verb == b"DATA":
                self.data = []
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                if self.buf.startswith(b".\r\n"):
                    self.buf = b"\r\n" + self.buf
            elif verb == b"QUIT":
                self.transport.write(b"221 Bye\r\n")
                self.transport.close()
                return
            else:  # HELO MAIL RCPT RSET NOOP
                self.transport.write(b"250 Ok\r\n")


async def _serve(port: int, out: Path) -> None:
    stamps: list[tuple[float, bytes]] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: _Session(stamps), "127.0.0.1", port)
    await stop.wait()
    server.close()
    text = "".join(f"{at:.6f} {act.decode(errors='replace')}\n" for at, act in stamps)
    await asyncio.to_thread(out.write_text, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.out))


if __name__ == "__main__":
    main()
