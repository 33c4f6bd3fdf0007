"""The SMTP pool against real aiosmtpd servers: reuse, reconnect, codes, timeouts, TLS, auth."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from devkit.smtp import SmtpRecorder
from service.delivery.smtp import PermanentSmtpError, SmtpConfig, SmtpPool, TransientSmtpError

MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hi\r\n\r\nhello\r\n"


class CountingRecorder(SmtpRecorder):
    """Counts sessions (EHLO/HELO), so connection reuse can be seen."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.sessions += 1
        return await super().handle_EHLO(server, session, envelope, hostname, responses)


@pytest.fixture
def counting() -> Iterator[CountingRecorder]:
    server = CountingRecorder()
    server.start()
    yield server
    server.stop()


def pool_for(port: int, **config: Any) -> SmtpPool:
    return SmtpPool(SmtpConfig(host="127.0.0.1", port=port, timeout=5, **config))


async def test_connections_are_reused_and_bounded(counting: CountingRecorder) -> None:
    pool = pool_for(counting.port, pool_size=2)
    await asyncio.gather(*(pool.send("a@x.test", f"u{i}@y.test", MESSAGE) for i in range(20)))
    await pool.close()
    assert len(counting.messages) == 20
    assert counting.sessions <= 2


async def test_4xx_is_transient_and_5xx_is_permanent(smtp_server: SmtpRecorder) -> None:
    pool = pool_for(smtp_server.port)
    smtp_server.fail_next(1, code=451)
    with pytest.raises(TransientSmtpError) as transient:
        await pool.send("a@x.test", "b@y.test", MESSAGE)
    assert transient.value.code == 451
    smtp_server.fail_rcpt("gone@y.test", code=550)
    with pytest.raises(PermanentSmtpError) as permanent:
        await pool.send("a@x.test", "gone@y.test", MESSAGE)
    assert permanent.value.code == 550
    await pool.send("a@x.test", "b@y.test", MESSAGE)
    await pool.close()
    assert [m.rcpt_tos for m in smtp_server.messages] == [("b@y.test",)]


async def test_server_restart_means_reconnect(smtp_server: SmtpRecorder) -> None:
    pool = pool_for(smtp_server.port, pool_size=1)
    await pool.send("a@x.test", "b@y.test", MESSAGE)
    smtp_server.stop()
    with pytest.raises(TransientSmtpError):
        await pool.send("a@x.test", "b@y.test", MESSAGE)
    with pytest.raises(TransientSmtpError):  # refused while down
        await pool.send("a@x.test", "b@y.test", MESSAGE)
    smtp_server.start()
    await pool.send("a@x.test", "c@y.test", MESSAGE)
    await pool.close()
    assert [m.rcpt_tos for m in smtp_server.messages] == [("b@y.test",), ("c@y.test",)]


async def test_a_silent_server_times_out_as_transient() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=port, timeout=0.5))
        with pytest.raises(TransientSmtpError):
            await asyncio.wait_for(pool.send("a@x.test", "b@y.test", MESSAGE), timeout=5)
        assert not await pool.ping()
    finally:
        listener.close()


async def test_ping() -> None:
    server = SmtpRecorder()
    server.start()
    try:
        assert await pool_for(server.port).ping()
    finally:
        server.stop()
    assert not await pool_for(server.port).ping()


# --- STARTTLS and AUTH against a server with its own CA-less self-signed certificate ---


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class Authenticator:
    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            b"notifier",
            b"s3cret",
        )
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[SmtpRecorder]:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    recorder = SmtpRecorder()
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=recorder.port,
        tls_context=context,
        require_starttls=True,
        authenticator=Authenticator(),
        auth_require_tls=True,
    )
    controller.start()
    yield recorder
    controller.stop()


async def test_starttls_and_auth(tls_server: SmtpRecorder, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    good = pool_for(
        tls_server.port,
        security="starttls",
        ca_file=str(cert),
        username="notifier",
        password="s3cret",
    )
    await good.send("a@x.test", "b@y.test", MESSAGE)
    await good.close()
    assert len(tls_server.messages) == 1

    # Wrong password and unverifiable certificates are the operator's problem: transient,
    # so mail waits instead of being dead-lettered.
    wrong = pool_for(
        tls_server.port,
        security="starttls",
        ca_file=str(cert),
        username="notifier",
        password="nope",
    )
    with pytest.raises(TransientSmtpError):
        await wrong.send("a@x.test", "b@y.test", MESSAGE)
    untrusted = pool_for(
        tls_server.port, security="starttls", username="notifier", password="s3cret"
    )
    with pytest.raises(TransientSmtpError):
        await untrusted.send("a@x.test", "b@y.test", MESSAGE)
    assert len(tls_server.messages) == 1
