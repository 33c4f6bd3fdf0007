"""Contract section 10 on the real broker: no history storms, no floods, releases once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devkit import CHECKOUT as REPO
from devkit.config import service_env
from devkit.events import CLOUDEVENT_HEADERS, customer_mail_event, encode, ticket_key
from devkit.process import ServiceProcess, child_environ, free_port
from devkit.smtp import SmtpRecorder
from devkit.topics import Record, read_topic
from devkit.topics import produce as produce_records
from devkit.waiting import settle

pytestmark = pytest.mark.integration

DAY_MS = 24 * 3600 * 1000


async def produce(
    bootstrap: str, topic: str, events: list[dict[str, Any]], timestamp_ms: int | None = None
) -> None:
    await produce_records(
        bootstrap,
        topic,
        [Record(ticket_key(ev), encode(ev), CLOUDEVENT_HEADERS, timestamp_ms) for ev in events],
    )


async def dead_letter_stages(bootstrap: str, dlq: str) -> list[str | None]:
    return [letter.header("x-error-stage") for letter in await read_topic(bootstrap, dlq)]


def start(env: dict[str, str], tmp_path: Path) -> ServiceProcess:
    service = ServiceProcess(env, free_port(), log_path=tmp_path / "service.log")
    service.start(60)
    return service


async def test_a_new_deployment_mails_no_history_and_serves_what_comes_after(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> None:
    three_days_ago = int(time.time() * 1000) - 3 * DAY_MS
    await produce(
        kafka_bootstrap, topic, [customer_mail_event(f"old-{i}") for i in range(5)], three_days_ago
    )
    env = service_env(tmp_path, bootstrap=kafka_bootstrap, topic=topic, smtp_port=smtp_server.port)
    service = await asyncio.to_thread(start, env, tmp_path)
    try:
        await produce(kafka_bootstrap, topic, [customer_mail_event("new-1")])
        await smtp_server.wait_for(1, timeout=30)
        assert await settle(lambda: len(smtp_server.messages)) == 1
        assert "a.new-1.customer_content" in smtp_server.messages[0].data.decode()
        metrics = await asyncio.to_thread(service.metrics_text)
        assert 'kind="customer_content",outcome="expired"} 5.0' in metrics
        logged = [r for r in service.log_records() if r.get("outcome") == "expired"]
        assert {r["activity_id"] for r in logged} == {f"old-{i}" for i in range(5)}
        assert all(r["reason"] == "history" for r in logged)
    finally:
        await asyncio.to_thread(service.stop)


async def test_an_smtp_outage_longer_than_the_grace_still_delivers(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> None:
    env = service_env(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        history_grace_minutes=0.05,  # 3 s
    )
    service = await asyncio.to_thread(start, env, tmp_path)
    try:
        await produce(kafka_bootstrap, topic, [customer_mail_event("warm-up")])
        await smtp_server.wait_for(1, timeout=30)  # the group's first start is recorded
        smtp_server.stop()
        await produce(kafka_bootstrap, topic, [customer_mail_event("during-outage")])
        await asyncio.sleep(6)  # twice the grace window
        smtp_server.start()
        await smtp_server.wait_for(2, timeout=60)
        assert "a.during-outage.customer_content" in smtp_server.messages[1].data.decode()
    finally:
        await asyncio.to_thread(service.stop)


async def test_a_flood_sends_the_limit_and_a_replay_releases_the_rest_once(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> None:
    limit = 10
    env = service_env(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        recipient_limit_per_hour=limit,
    )
    service = await asyncio.to_thread(start, env, tmp_path)
    try:
        # A producer bug: 40 distinct activities for one customer within a minute.
        await produce(kafka_bootstrap, topic, [customer_mail_event(f"loop-{i}") for i in range(40)])
        await smtp_server.wait_for(limit, timeout=30)
        assert await settle(lambda: len(smtp_server.messages)) == limit
        dlq = f"{topic}.dlq"
        stages = await dead_letter_stages(kafka_bootstrap, dlq)
        assert stages == ["throttled"] * 30
        # Someone looked; `notifier dlq replay --stage throttled` releases them, once.
        for _ in range(2):
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "service", "dlq", "replay", "--stage", "throttled"],
                env=child_environ(env),
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert "replayed 30 dead letter(s)" in done.stdout
        await smtp_server.wait_for(40, timeout=60)
        assert await settle(lambda: len(smtp_server.messages), 5.0) == 40
        ids = [m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in smtp_server.messages]
        assert len(set(ids)) == 40
    finally:
        await asyncio.to_thread(service.stop)
