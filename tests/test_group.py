"""Several instances: a SQLite ledger in a group with other members is reported loudly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from devkit.config import service_env
from devkit.process import ServiceProcess, free_port
from devkit.smtp import SmtpRecorder

pytestmark = pytest.mark.integration


async def test_a_sqlite_ledger_in_a_shared_group_is_reported_loudly(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> None:
    group = f"{topic}-group"
    env = service_env(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        group_id=group,
        watch_interval_seconds=0.5,
    )
    service = ServiceProcess(env, free_port(), log_path=tmp_path / "service.log")
    await asyncio.to_thread(service.start, 60)
    other = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group)
    try:
        ready = await _wait_for(lambda: service.get("/readyz").status_code == 200, 30)
        assert ready, "the service alone in its group never became ready"
        await other.start()
        # The second member joins; the service's next count sees it.
        unready = await _wait_for(lambda: "sqlite ledger" in service.get("/readyz").text, 30)
        assert unready, "a second member went unnoticed"
        response = service.get("/readyz")
        assert response.status_code == 503
        assert "sqlite ledger shared by 2 instances" in response.text
        metrics = service.metrics_text()
        assert "notifier_unsafe_ledger 1.0" in metrics
        assert "notifier_group_members 2.0" in metrics
        errors = [r for r in service.log_records() if r.get("level") == "ERROR"]
        assert any("not this SQLite ledger" in r["msg"] for r in errors)
        await other.stop()
        # Alone again: ready again once the group has settled.
        assert await _wait_for(lambda: service.get("/readyz").status_code == 200, 60)
    finally:
        await other.stop()
        await asyncio.to_thread(service.stop, 30)


async def _wait_for(check: object, timeout: float) -> bool:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await asyncio.to_thread(check):  # type: ignore[arg-type]
            return True
        await asyncio.sleep(0.3)
    return False
