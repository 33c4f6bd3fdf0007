"""A throwaway PostgreSQL cluster (Debian's initdb, pg_ctl) on 127.0.0.1 for tests."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from devkit.process import free_port

SUPERUSER = "postgres"
# Test clusters only: the password is known to every test that connects.
PASSWORD = "notifier-test"  # noqa: S105
# PostgreSQL refuses to run as root; as root, the cluster runs as this system user.
SYSTEM_USER = "postgres"


class PostgresError(RuntimeError):
    """The binaries are missing or the cluster did not start."""


def bin_dir() -> Path:
    """The newest `/usr/lib/postgresql/N/bin` (Debian's layout), else the folder of `pg_ctl`."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    if found := shutil.which("pg_ctl"):
        return Path(found).parent
    raise PostgresError("PostgreSQL binaries not found: apt-get install postgresql")


_running: weakref.WeakSet[PostgresCluster] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # pg_ctl detaches the server: nothing else would end it if a caller forgot stop().
    for cluster in list(_running):
        cluster.kill()


class PostgresCluster:
    """One cluster in its own temporary folder, listening on 127.0.0.1 only (TCP, password auth).

    The folder is made here rather than under pytest's tmp_path: that one is private to
    root, and the server must own its data folder.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="notifier-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self._bin = bin_dir()
        self._as_root = os.geteuid() == 0
        self._initialised = False

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.pid() is not None

    def pid(self) -> int | None:
        """The postmaster's pid, if it runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise PostgresError(f"{args[0]} failed: {done.stderr.strip()}\n{log}")

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_root:
            user = pwd.getpwnam(SYSTEM_USER)
            for path in (self.root, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=peer",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        self._initialised = True

    def start(self) -> None:
        """Start the server (initialising the folder first); return once it takes connections."""
        if not self._initialised:
            self._initdb()
        options = " ".join(
            (
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                # No fsync: a throwaway cluster need not survive a power cut. Commits still
                # reach the kernel before they return, so killing the server (a fault
                # test) loses nothing, as in production.
                "-c fsync=off",
                "-c max_connections=200",
                "-c shared_buffers=64MB",
            )
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_path), "-w", "-o", options
        )
        _running.add(self)

    def stop(self) -> None:
        """Stop it cleanly (fast shutdown: sessions are ended, nothing waits for them)."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
        _running.discard(self)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: the crash case, then wait for them to go."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Its children notice the postmaster is gone and exit on their own; a start
            # before they have would find their shared memory still in use.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (_alive(pid) or self._processes()):
                time.sleep(0.05)
            for child in self._processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        _running.discard(self)

    def _processes(self) -> list[int]:
        """Server processes of this cluster: every one works in its data folder."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if Path(os.readlink(proc / "cwd")) == self.data:
                        found.append(int(proc.name))
        return found

    def remove(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create an empty database; its URL."""
        return create_database(self.url(), name)


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server `server_url` points at."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database(server_url: str, name: str) -> str:
    """Create database `name` (a plain identifier) through `server_url`; its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database `name`, ending its sessions (PostgreSQL 13+)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
