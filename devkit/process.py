"""Processes and ports: free ports, stopping children, `notifier` commands, the service process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from devkit import CHECKOUT

SERVICE_COMMAND = (sys.executable, "-m", "service", "run")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def terminate(
    proc: subprocess.Popen[Any] | None, timeout: float, sig: int = signal.SIGTERM
) -> int | None:
    """Send `sig` (SIGTERM), then SIGKILL if still there after `timeout`; the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def child_environ(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment for a `python -m service` child configured by `settings` alone.

    NOTIFY_* variables of this process are dropped, and the checkout goes first on
    PYTHONPATH so the package imports even when it is not pip-installed.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(CHECKOUT), environ.get("PYTHONPATH", "")) if p
    )
    environ.update(settings)
    return environ


def run_notifier(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` in the checkout, configured by `env` alone; not checked."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=child_environ(env or {}),
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ServiceError(RuntimeError):
    """The service did not start, or died; the message carries the tail of its log."""


class ServiceProcess:
    """One `python -m service run` (or `command`) with the given NOTIFY_* settings, on 127.0.0.1.

    NOTIFY_* variables of the calling environment are dropped, so only `env` configures
    the service; NOTIFY_HTTP_HOST/PORT are set from `http_port`. Output (JSON log lines)
    goes to `log_path`, appended across restarts of the same object. `stop()` sends
    `stop_signal`: SIGTERM, as in production, or SIGINT for a profiler that must write
    its report on the way out.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        http_port: int,
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
        command: Sequence[str] = SERVICE_COMMAND,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.env = dict(env)
        self.http_port = http_port
        self.base_url = f"http://127.0.0.1:{http_port}"
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="notifier-")) / "service.log"
        self.log_path = log_path
        self.cwd = cwd or CHECKOUT
        self.command = tuple(command)
        self.stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._offset = 0

    # -- lifecycle --

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30) -> None:
        """Start the process and return once GET /healthz answers 200."""
        if self.running:
            return
        self.spawn()
        self.wait_healthy(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (then `wait_healthy`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._offset = self._log.tell()
        environ = child_environ(self.env)
        environ["NOTIFY_HTTP_HOST"] = "127.0.0.1"
        environ["NOTIFY_HTTP_PORT"] = str(self.http_port)
        self._proc = subprocess.Popen(
            list(self.command),
            cwd=self.cwd,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C meant for pytest does not reach the service first.
            start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 30) -> None:
        """Return once GET /healthz answers 200; ServiceError (and a kill) if it never does."""
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        assert self._proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise ServiceError(
                        f"service exited with {self._proc.returncode}:\n"
                        f"{self.log_text(self._offset)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/healthz").status_code == 200:
                        return
                time.sleep(0.05)
        raise ServiceError(f"no /healthz after {timeout} s:\n{self.log_text(self._offset)}")

    def stop(self, timeout: float = 30) -> int | None:
        """`stop_signal` (graceful shutdown), then SIGKILL after `timeout`; the exit code.

        After a graceful shutdown the code is -SIGTERM: uvicorn re-raises the signal it
        caught once it has shut down, so the process ends "killed by SIGTERM".
        """
        terminate(self._proc, timeout, self.stop_signal)
        return self._closed()

    def kill(self) -> int | None:
        """SIGKILL, as a crash would; returns the exit code."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        return self._closed()

    def _closed(self) -> int | None:
        code = self._proc.returncode if self._proc is not None else None
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- looking at it --

    def get(self, path: str, timeout: float = 10) -> httpx.Response:
        """GET one of the service's HTTP endpoints (/healthz, /readyz, /metrics)."""
        return httpx.get(f"{self.base_url}{path}", timeout=timeout)

    def metrics_text(self) -> str:
        """The Prometheus text exposition of GET /metrics."""
        response = self.get("/metrics")
        response.raise_for_status()
        return response.text

    def log_text(self, offset: int = 0) -> str:
        """What the service wrote to stdout/stderr (from byte `offset` on)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        """Every output line that is a JSON object; other lines are skipped."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    records.append(value)
        return records
