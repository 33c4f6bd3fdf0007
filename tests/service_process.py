"""`notifier run` as a child process: start, wait for /healthz, stop with SIGTERM or kill."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from devkit.devstack import child_environ, terminate

REPO = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """The service did not start, or died; the message carries the tail of its log."""


class ServiceProcess:
    """One `python -m service run` with the given NOTIFY_* settings, serving on 127.0.0.1.

    NOTIFY_* variables of the calling environment are dropped, so only `env` configures
    the service; NOTIFY_HTTP_HOST/PORT are set from `http_port`. Output (JSON log lines)
    goes to `log_path`, appended across restarts of the same object.
    """

    command: tuple[str, ...] = (sys.executable, "-m", "service", "run")

    def __init__(
        self,
        env: Mapping[str, str],
        http_port: int,
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.env = dict(env)
        self.http_port = http_port
        self.base_url = f"http://127.0.0.1:{http_port}"
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="notifier-")) / "service.log"
        self.log_path = log_path
        self.cwd = cwd or REPO
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        offset = self._log.tell()
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
        try:
            self._wait_healthy(offset, timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, offset: int, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise ServiceError(
                        f"service exited with {self._proc.returncode}:\n{self.log_text(offset)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/healthz").status_code == 200:
                        return
                time.sleep(0.1)
        raise ServiceError(f"no /healthz after {timeout} s:\n{self.log_text(offset)}")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL after `timeout`; returns the exit code.

        After a graceful shutdown the code is -SIGTERM: uvicorn re-raises the signal it
        caught once it has shut down, so the process ends "killed by SIGTERM".
        """
        terminate(self._proc, timeout)
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

    def log_records(self) -> list[dict[str, Any]]:
        """Every output line that is a JSON object; other lines are skipped."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    records.append(value)
        return records
