"""Reminders on the real broker: due in seconds, across a SIGKILL, moved, cancelled, stale."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from devkit.config import service_env
from devkit.events import customer_mail_event, publish
from devkit.process import ServiceProcess, free_port
from devkit.smtp import SmtpRecorder

pytestmark = pytest.mark.integration

AUTHOR = "alice@helpdesk.test"
STAFF = "bob@helpdesk.test"


def at(seconds: float) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).replace(microsecond=0)


def event(activity_id: str, *, updated: bool = False, **fields: Any) -> dict[str, Any]:
    """An activity by alice for staff bob (and the customer), with `fields` on top."""
    ev = customer_mail_event(activity_id, activityUser="alice", activityUsers="bob", **fields)
    if updated:
        ev["type"] = "ticketActivity.updated"
        ev["id"] = f"{ev['id']}-update"
    return ev


def followup(moment: dt.datetime) -> dict[str, str]:
    return {"followupDate": moment.date().isoformat(), "followupTime": moment.time().isoformat()}


def action(moment: dt.datetime) -> dict[str, str]:
    return {
        "actionRequiredDate": moment.date().isoformat(),
        "actionRequiredTime": moment.time().isoformat(),
    }


def reminders(smtp: SmtpRecorder, kind: str) -> list[str]:
    """Recipients of the `kind` reminders received so far."""
    return sorted(to for m in smtp.messages if f".{kind}.".encode() in m.data for to in m.rcpt_tos)


async def until(check: Any, timeout: float) -> bool:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.2)
    return bool(check())


@pytest.fixture
async def service(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> Any:
    env = service_env(tmp_path, bootstrap=kafka_bootstrap, topic=topic, smtp_port=smtp_server.port)
    proc = ServiceProcess(env, free_port(), log_path=tmp_path / "service.log")
    await asyncio.to_thread(proc.start, 60)
    yield proc
    await asyncio.to_thread(proc.stop, 30)


async def test_a_reminder_due_in_seconds_arrives_once_across_a_sigkill(
    service: ServiceProcess, kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder
) -> None:
    due = at(12)
    await publish(kafka_bootstrap, topic, [event("r-1", **followup(due))])
    # Scheduled once the event's staff mail went out; then the service dies before the moment.
    assert await until(lambda: STAFF in [t for m in smtp_server.messages for t in m.rcpt_tos], 30)
    await asyncio.to_thread(service.kill)
    await asyncio.to_thread(service.start, 60)
    assert await until(lambda: len(reminders(smtp_server, "followup_reminder")) >= 2, 60)
    await asyncio.sleep(3)  # nothing more comes
    assert reminders(smtp_server, "followup_reminder") == [AUTHOR, STAFF]  # never the customer
    assert dt.datetime.now(dt.UTC) >= due


async def test_an_update_cancels_an_action_reminder_and_another_moves_a_follow_up(
    service: ServiceProcess, kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder
) -> None:
    await publish(
        kafka_bootstrap,
        topic,
        [
            event("r-2", **action(at(8))),
            event("r-3", **followup(at(3600))),
        ],
    )
    assert await until(lambda: len(smtp_server.messages) >= 4, 30)  # customer + staff, twice
    taken = {**action(at(8)), "actionTakenDate": dt.date.today().isoformat()}
    moved = at(6)
    await publish(
        kafka_bootstrap,
        topic,
        [event("r-2", updated=True, **taken), event("r-3", updated=True, **followup(moved))],
    )
    assert await until(lambda: len(reminders(smtp_server, "followup_reminder")) >= 2, 40)
    await asyncio.sleep(max(0.0, (at(8) - dt.datetime.now(dt.UTC)).total_seconds()) + 4)
    assert reminders(smtp_server, "action_reminder") == []
    assert reminders(smtp_server, "followup_reminder") == [AUTHOR, STAFF]


async def test_a_backlog_of_old_events_sends_no_reminder(
    service: ServiceProcess, kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder
) -> None:
    old = at(-3 * 24 * 3600)
    await publish(
        kafka_bootstrap,
        topic,
        [event(f"r-old-{i}", **followup(old), **action(old)) for i in range(3)],
    )
    assert await until(lambda: len(smtp_server.messages) >= 6, 30)  # the ordinary mails
    await asyncio.sleep(4)
    assert reminders(smtp_server, "followup_reminder") == []
    assert reminders(smtp_server, "action_reminder") == []
    metrics = await asyncio.to_thread(service.metrics_text)
    assert 'notifier_reminders_total{action="expired"} 6.0' in metrics
