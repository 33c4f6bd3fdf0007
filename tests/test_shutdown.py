"""SIGTERM mid-stream: the process stops within its bound, and a restart finishes the work
without losing or repeating a mail."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from pathlib import Path

import pytest

from devkit.config import service_env
from devkit.events import publish
from devkit.process import ServiceProcess, free_port
from devkit.smtp import SmtpRecorder

pytestmark = pytest.mark.integration

EVENTS = 300


def event(i: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"shutdown-{i}",
        "source": "/test",
        "type": "ticketActivity.created",
        "time": "2026-11-27T09:15:00Z",
        "data": {
            "activity": {
                "id": f"s{i}",
                "ticketID": str(i % 40),
                "sendContentByEmail": "Yes",
                "activityText": f"message {i}",
            },
            "ticket": {
                "id": str(i % 40),
                "reference": f"T-{i % 40}",
                "subject": "Shutdown",
                "customer": {"email": f"customer{i}@customer.test"},
            },
        },
    }


def message_ids(server: SmtpRecorder) -> list[str]:
    return [
        str(email.message_from_bytes(m.data, policy=email.policy.default)["Message-ID"])
        for m in server.messages
    ]


async def test_sigterm_finishes_or_abandons_in_flight_work_without_loss(
    tmp_path: Path, kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder
) -> None:
    smtp_server.delay = 0.05  # slow enough that the stop lands mid-stream
    env = service_env(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        smtp_pool_size=4,
        directory_file=None,
        graceful_timeout_seconds=10,
    )
    service = ServiceProcess(env, free_port(), log_path=tmp_path / "service.log")
    service.start(timeout=60)
    await publish(kafka_bootstrap, topic, [event(i) for i in range(EVENTS)])
    await smtp_server.wait_for(20, timeout=60)

    started = time.monotonic()
    await asyncio.to_thread(service.stop, 30)
    stopped_in = time.monotonic() - started
    at_stop = len(smtp_server.messages)
    assert stopped_in < 15, f"SIGTERM took {stopped_in:.1f} s"
    assert at_stop < EVENTS, "the stop came too late to test anything"
    await asyncio.sleep(1.0)
    assert len(smtp_server.messages) == at_stop, "mail went out after the process stopped"

    service.start(timeout=60)
    try:
        await smtp_server.wait_for(EVENTS, timeout=120)
        await asyncio.sleep(1.0)
    finally:
        await asyncio.to_thread(service.stop, 30)
    ids = message_ids(smtp_server)
    assert len(set(ids)) == EVENTS, "lost mail"
    assert len(ids) == EVENTS, f"{len(ids) - len(set(ids))} mails sent twice"
    assert "shut down gracefully" in service.log_text()
