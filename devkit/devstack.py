"""Local Kafka (KRaft node from Maven Central jars) and SMTP capture for development and tests."""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import email.parser
import email.policy
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

CHECKOUT = Path(__file__).resolve().parent.parent
KAFKA_DIR = CHECKOUT / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J_CONFIG = KAFKA_DIR / "log4j2.properties"
MARKER = ".complete"
READY_LINE = "Kafka Server started"

# Small heap, serial GC and C1 only: the JVM starts in ~1.5 s on 2 cores and leaves room for tests.
JVM_FLAGS = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Dlog4j2.disableJmx=true",
)

DEV_KAFKA_PORT = 9092
DEV_CONTROLLER_PORT = 9093
DEV_SMTP_PORT = 1025


class DevstackError(RuntimeError):
    """Jars could not be fetched or the broker did not start."""


def kafka_version(pom: Path = POM) -> str:
    """The `kafka.version` property of kafka/pom.xml."""
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if found is None:
        raise DevstackError(f"{pom}: no <kafka.version> property")
    return found[1]


def kafka_jar_dir() -> Path:
    """Where the broker's jars are cached: `$NOTIFY_KAFKA_CACHE` or under ~/.cache, per version."""
    if env := os.environ.get("NOTIFY_KAFKA_CACHE"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ticket-notifier" / f"kafka-{kafka_version()}" / "libs"


def ensure_kafka_jars(libs: Path | None = None) -> Path:
    """Copy the broker's runtime jars into the cache with Maven unless a complete copy is there."""
    libs = libs or kafka_jar_dir()
    # The marker holds the pom's hash, so an edited pom (or a half-copied dir) is fetched again.
    want = hashlib.sha256(POM.read_bytes()).hexdigest()
    marker = libs / MARKER
    if _read(marker) == want:
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    # A lock, because parallel test sessions or scripts may fetch into the same cache at once.
    with (libs.parent / f".{libs.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read(marker) == want:
            return libs
        if shutil.which("mvn") is None:
            raise DevstackError("mvn not found: install Maven (Debian package `maven`)")
        shutil.rmtree(libs, ignore_errors=True)
        cmd = [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(POM),
            "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise DevstackError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        marker.write_text(want)
    return libs


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def new_cluster_id() -> str:
    """22 url-safe base64 chars of a random UUID; Kafka's tools reject a leading '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


_running: weakref.WeakSet[KafkaNode] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # The JVM runs in its own session, so nothing else would end it if a caller forgot stop().
    for node in list(_running):
        node.kill()


class KafkaNode:
    """One KRaft node (broker and controller in one JVM) on 127.0.0.1, data kept in data_dir."""

    def __init__(self, data_dir: Path, port: int = 0, controller_port: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        # Ports are fixed once here so that restart() comes back where clients expect it.
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.log_path = self.data_dir / "broker.log"
        self.config_path = self.data_dir / "server.properties"
        self.log_dirs = self.data_dir / "kraft"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def server_properties(self) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "4",
            "default.replication.factor": "1",
            "auto.create.topics.enable": "true",
            # Defaults tuned for clusters: 3 s join delay and 50 offsets partitions slow every test.
            "group.initial.rebalance.delay.ms": "0",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "num.network.threads": "2",
            "num.io.threads": "2",
            # After a kill the new incarnation waits out the old one's session (9 s by default).
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
            # The cleaner allocates this on start (128 MiB by default); 1 MiB is plenty here.
            "log.cleaner.dedupe.buffer.size": "1048577",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def start(self, timeout: float = 90) -> None:
        """Format storage on first use, start the JVM and wait until the broker serves clients."""
        if self.running:
            return
        libs = ensure_kafka_jars()
        java = shutil.which("java")
        if java is None:
            raise DevstackError("java not found: install a JRE 17 (openjdk-17-jre-headless)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.server_properties())
        base = [java, *JVM_FLAGS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", "-cp", f"{libs}/*"]
        for port in (self.port, self.controller_port):
            if _accepts(port):
                raise DevstackError(f"something already listens on 127.0.0.1:{port}")
        if not (self.log_dirs / "meta.properties").exists():
            self._format(base, timeout)
        self._log = self.log_path.open("ab")
        offset = self._log.tell()
        self._log.write(f"--- devstack: starting broker on {self.bootstrap}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            [*base, "kafka.Kafka", str(self.config_path)],
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C in a terminal reaches us, and we stop the broker in order.
            start_new_session=True,
        )
        _running.add(self)
        try:
            self._wait_ready(offset, timeout)
        except BaseException:
            self.stop()
            raise

    def _format(self, base: list[str], timeout: float) -> None:
        cmd = [
            *base,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            new_cluster_id(),
            "--config",
            str(self.config_path),
            "--standalone",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise DevstackError(f"formatting {self.log_dirs} failed:\n{done.stdout}{done.stderr}")

    def _wait_ready(self, offset: int, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DevstackError(
                    f"broker exited with {self._proc.returncode}:\n{self.log_tail(offset)}"
                )
            if READY_LINE in self.log_tail(offset) and _accepts(self.port):
                return
            time.sleep(0.1)
        raise DevstackError(f"broker not ready after {timeout} s:\n{self.log_tail(offset)}")

    def log_tail(self, offset: int = 0, limit: int = 20_000) -> str:
        """The broker log from offset on (its last `limit` characters)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (clean shutdown), then SIGKILL if the broker is still up after timeout."""
        terminate(self._proc, timeout)
        self._closed()

    def kill(self) -> None:
        """SIGKILL, as a crash would: the next start() recovers the logs."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._closed()

    def restart(self, timeout: float = 90) -> None:
        """Stop, then start again on the same ports and data (no reformat)."""
        self.stop()
        self.start(timeout)

    def _closed(self) -> None:
        self._proc = None
        _running.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> KafkaNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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


def terminate(proc: subprocess.Popen[Any] | None, timeout: float) -> int | None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout`; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


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
    from aiosmtpd.controller import Controller  # dev dependency, only needed here

    maildir.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        _CaptureHandler(maildir), hostname=host, port=port, enable_SMTPUTF8=True
    )
    controller.start()
    return controller


def main(argv: list[str]) -> int:
    """`notifier dev up|kafka|smtp [options]`; argv is what follows "dev", e.g. ["up"].

    up: Kafka on 127.0.0.1:9092 and SMTP capture on 127.0.0.1:1025 into ./var/mail;
    kafka: only the broker; smtp: only the capture. Runs until Ctrl-C or SIGTERM.
    """
    parser = argparse.ArgumentParser(prog="notifier dev", description=main.__doc__)
    parser.add_argument("what", choices=["up", "kafka", "smtp"])
    parser.add_argument("--var", type=Path, default=Path("var"), help="state dir (./var)")
    parser.add_argument("--kafka-port", type=int, default=DEV_KAFKA_PORT)
    parser.add_argument("--controller-port", type=int, default=DEV_CONTROLLER_PORT)
    parser.add_argument("--smtp-port", type=int, default=DEV_SMTP_PORT)
    parser.add_argument("--fresh", action="store_true", help="wipe Kafka's data first")
    args = parser.parse_args(argv)

    stop = threading.Event()
    # SIGTERM ends the wait like Ctrl-C does, so both paths stop the servers in order.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node: KafkaNode | None = None
    smtp: Stoppable | None = None
    try:
        if args.what in ("up", "kafka"):
            kafka_dir = args.var / "kafka"
            if args.fresh:
                shutil.rmtree(kafka_dir, ignore_errors=True)
            node = KafkaNode(kafka_dir, args.kafka_port, args.controller_port)
            print(f"kafka: starting (jars: {kafka_jar_dir()})", flush=True)
            node.start()
            print(f"kafka: {node.bootstrap}  data: {node.data_dir}  log: {node.log_path}")
        if args.what in ("up", "smtp"):
            maildir = (args.var / "mail").resolve()
            smtp = run_smtp_capture("127.0.0.1", args.smtp_port, maildir)
            print(f"smtp:  127.0.0.1:{args.smtp_port}  mail: {maildir}")
        print("ready; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            if node is not None and not node.running:
                print(f"kafka: broker exited, see {node.log_path}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    except (DevstackError, OSError) as e:
        print(f"notifier dev: {e}", file=sys.stderr)
        return 1
    finally:
        if smtp is not None:
            with contextlib.suppress(Exception):
                smtp.stop()
        if node is not None:
            node.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
