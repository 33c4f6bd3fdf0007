"""A local Kafka node (KRaft, broker and controller in one JVM) from Maven Central jars."""

from __future__ import annotations

import atexit
import base64
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
import uuid
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO

from devkit import CHECKOUT
from devkit.process import free_port, listening, terminate

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


class KafkaNodeError(RuntimeError):
    """Jars could not be fetched or the broker did not start."""


def kafka_version(pom: Path = POM) -> str:
    """The `kafka.version` property of kafka/pom.xml."""
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if found is None:
        raise KafkaNodeError(f"{pom}: no <kafka.version> property")
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
            raise KafkaNodeError("mvn not found: install Maven (Debian package `maven`)")
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
            raise KafkaNodeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        marker.write_text(want)
    return libs


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


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
            # The group coordinator (Kafka 4) holds each offsets write up to 5 ms to batch it
            # with others; with one consumer group that only adds 5 ms to every commit.
            "group.coordinator.append.linger.ms": "0",
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
            raise KafkaNodeError("java not found: install a JRE 17 (openjdk-17-jre-headless)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.server_properties())
        base = [java, *JVM_FLAGS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", "-cp", f"{libs}/*"]
        for port in (self.port, self.controller_port):
            if listening(port):
                raise KafkaNodeError(f"something already listens on 127.0.0.1:{port}")
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
            raise KafkaNodeError(f"formatting {self.log_dirs} failed:\n{done.stdout}{done.stderr}")

    def _wait_ready(self, offset: int, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise KafkaNodeError(
                    f"broker exited with {self._proc.returncode}:\n{self.log_tail(offset)}"
                )
            if READY_LINE in self.log_tail(offset) and listening(self.port):
                return
            time.sleep(0.1)
        raise KafkaNodeError(f"broker not ready after {timeout} s:\n{self.log_tail(offset)}")

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
