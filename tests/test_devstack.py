"""The dev stack itself: the session broker, the SMTP capture, the SMTP recorder's fault hooks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devkit.kafka import KafkaNode, new_cluster_id
from devkit.process import free_port
from devkit.smtp import SmtpRecorder, run_smtp_capture

ROOT = Path(__file__).resolve().parent.parent


def _mail(to: str, subject: str = "hello", mid: str = "<abc.123@example.test>") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "notifier@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = mid
    msg.set_content("Line one.\n.leading dot stays\n")
    return msg


async def _consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"{topic}-g", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        values: list[bytes] = []
        while len(values) < count:
            msg = await asyncio.wait_for(consumer.getone(), 30)
            values.append(msg.value)
        return values
    finally:
        await consumer.stop()


def test_cluster_id_shape() -> None:
    for _ in range(200):
        cid = new_cluster_id()
        assert len(cid) == 22
        assert not cid.startswith("-")


@pytest.mark.integration
async def test_broker_roundtrip(kafka_bootstrap: str, topic: str, dlq_topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        assert len(await producer.partitions_for(topic)) == 4
        assert len(await producer.partitions_for(dlq_topic)) == 4
        await producer.send_and_wait(topic, b"payload", key=b"T-1", headers=[("ce_id", b"1")])
    finally:
        await producer.stop()
    assert await _consume(kafka_bootstrap, topic, 1) == [b"payload"]


@pytest.mark.integration
async def test_broker_survives_kill_and_restart(kafka_node: KafkaNode, topic: str) -> None:
    bootstrap = kafka_node.bootstrap
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    await producer.send_and_wait(topic, b"before", key=b"k")
    await producer.stop()

    await asyncio.to_thread(kafka_node.kill)
    assert not kafka_node.running
    await asyncio.to_thread(kafka_node.restart)
    assert kafka_node.running
    assert kafka_node.bootstrap == bootstrap

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    await producer.send_and_wait(topic, b"after", key=b"k")
    await producer.stop()
    # Same key, same partition: order is kept across the crash.
    assert await _consume(bootstrap, topic, 2) == [b"before", b"after"]


@pytest.mark.integration
async def test_smtp_capture_writes_eml(tmp_path: Path) -> None:
    port = free_port()
    controller = run_smtp_capture("127.0.0.1", port, tmp_path / "mail")
    try:
        msg = _mail("customer@example.test")
        await aiosmtplib.send(
            msg,
            hostname="127.0.0.1",
            port=port,
            sender="bounce@example.test",
            recipients=["customer@example.test", "copy@example.test"],
        )
    finally:
        controller.stop()
    [eml] = (tmp_path / "mail").glob("*.eml")
    assert eml.name == "1-abc.123@example.test.eml"
    data = eml.read_bytes()
    assert data.startswith(b"From: notifier@example.test\r\n")
    assert b"\r\n.leading dot stays\r\n" in data  # dot-unstuffed, CRLF as on the wire
    envelope = json.loads(eml.with_suffix(".json").read_text())
    assert envelope["mail_from"] == "bounce@example.test"
    assert envelope["rcpt_tos"] == ["customer@example.test", "copy@example.test"]


@pytest.mark.integration
async def test_smtp_server_records(smtp_server: SmtpRecorder) -> None:
    await aiosmtplib.send(_mail("a@example.test"), hostname=smtp_server.host, port=smtp_server.port)
    [received] = await smtp_server.wait_for(1)
    assert received.mail_from == "notifier@example.test"
    assert received.rcpt_tos == ("a@example.test",)
    assert smtp_server.emails()[0]["Subject"] == "hello"


@pytest.mark.integration
async def test_smtp_server_fail_rcpt(smtp_server: SmtpRecorder) -> None:
    smtp_server.fail_rcpt("Bad@Example.test", code=550)
    host, port = smtp_server.host, smtp_server.port
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await aiosmtplib.send(_mail("bad@example.test"), hostname=host, port=port)
    assert refused.value.recipients[0].code == 550

    # One refused among several: the others still get the message.
    errors, _ = await aiosmtplib.send(
        _mail("bad@example.test, good@example.test"), hostname=host, port=port
    )
    assert errors["bad@example.test"].code == 550
    assert smtp_server.messages[0].rcpt_tos == ("good@example.test",)

    smtp_server.clear_faults()
    await aiosmtplib.send(_mail("bad@example.test"), hostname=host, port=port)
    assert len(smtp_server.messages) == 2


@pytest.mark.integration
async def test_smtp_server_fail_next(smtp_server: SmtpRecorder) -> None:
    smtp_server.fail_next(2, code=451)
    host, port = smtp_server.host, smtp_server.port
    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await aiosmtplib.send(_mail("a@example.test"), hostname=host, port=port)
        assert refused.value.code == 451
    await aiosmtplib.send(_mail("a@example.test"), hostname=host, port=port)
    assert smtp_server.data_attempts == 3
    assert len(smtp_server.messages) == 1

    smtp_server.fail_next(1, code=554, text="5.7.1 rejected")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await aiosmtplib.send(_mail("a@example.test"), hostname=host, port=port)
    assert refused.value.code == 554


@pytest.mark.integration
async def test_smtp_server_fail_next_rcpt(smtp_server: SmtpRecorder) -> None:
    smtp_server.fail_next_rcpt(2, code=451)
    host, port = smtp_server.host, smtp_server.port
    for to in ("a@example.test", "b@example.test"):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await aiosmtplib.send(_mail(to), hostname=host, port=port)
        assert refused.value.recipients[0].code == 451
    await aiosmtplib.send(_mail("a@example.test"), hostname=host, port=port)
    assert smtp_server.rcpt_refusals == 2
    assert [m.rcpt_tos for m in smtp_server.messages] == [("a@example.test",)]


@pytest.mark.integration
async def test_smtp_server_stop_start_same_port(smtp_server: SmtpRecorder) -> None:
    host, port = smtp_server.host, smtp_server.port
    smtp_server.stop()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await aiosmtplib.send(_mail("a@example.test"), hostname=host, port=port, timeout=5)
    smtp_server.start()
    assert smtp_server.port == port
    await aiosmtplib.send(_mail("a@example.test"), hostname=host, port=port)
    await smtp_server.wait_for(1)


@pytest.mark.integration
def test_dev_up_starts_and_stops(tmp_path: Path) -> None:
    kafka_port, smtp_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from devkit.devstack import main; sys.exit(main(sys.argv[1:]))",
        "up",
        f"--var={tmp_path / 'var'}",
        f"--kafka-port={kafka_port}",
        f"--controller-port={free_port()}",
        f"--smtp-port={smtp_port}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ready"):
                break
        assert lines, "dev up printed nothing"
        assert lines[-1].startswith("ready"), "".join(lines)
        assert any(f"127.0.0.1:{kafka_port}" in line for line in lines)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, "".join(lines) + out
        assert out.strip().endswith("stopped")
        assert (tmp_path / "var" / "kafka" / "broker.log").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
