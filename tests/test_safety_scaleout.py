"""Contract section 10 across instances: three `notifier run` on one PostgreSQL ledger still
send at most NOTIFY_RECIPIENT_LIMIT_PER_HOUR mails an hour to one address."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from devkit.config import service_env
from devkit.events import CLOUDEVENT_HEADERS, customer_mail_event, encode
from devkit.process import ServiceProcess, free_port, run_notifier
from devkit.smtp import SmtpRecorder
from devkit.topics import Record, group_members, produce, read_topic
from devkit.waiting import poll, settle

pytestmark = pytest.mark.integration

INSTANCES = 3
LIMIT = 10
FLOOD = 40


def flood_event(run: str, n: int) -> dict[str, Any]:
    """Activity `n` of the flood: one customer_content mail to dana, on a ticket of its own
    (so the keys spread over every partition, and so over every instance)."""
    event = customer_mail_event(
        f"{run}-a{n}", ticketID=f"{run}-t{n}", followupDate=None, followupTime=None
    )
    event["data"]["ticket"] = {
        "id": f"{run}-t{n}",
        "reference": f"F-{n}",
        "subject": "Flood",
        "customer": {"name": "Dana Smith", "email": "Dana@Customer.test", "locale": "de"},
    }
    return event


def outcomes(service: ServiceProcess) -> dict[str, int]:
    """How often this instance logged each outcome."""
    counts: dict[str, int] = {}
    for record in service.log_records():
        if outcome := record.get("outcome"):
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


async def test_three_instances_together_send_at_most_the_limit(
    kafka_bootstrap: str,
    topic: str,
    smtp_server: SmtpRecorder,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    env = service_env(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        ledger_url=postgres_url,
        recipient_limit_per_hour=LIMIT,
        render_workers=0,
    )
    services = [
        ServiceProcess(env, free_port(), log_path=tmp_path / f"instance-{i}.log")
        for i in range(INSTANCES)
    ]
    try:
        for service in services:
            service.spawn()
        await asyncio.gather(*(asyncio.to_thread(s.wait_healthy, 60) for s in services))

        async def all_members() -> bool:
            state, members = await group_members(kafka_bootstrap, f"{topic}-notifier")
            return state == "Stable" and len(members) == INSTANCES

        await poll(all_members, 60, f"{INSTANCES} stable members", interval=0.3)
        # A producer bug: 40 distinct activities for one customer, on 40 tickets.
        run = uuid.uuid4().hex[:8]
        events = [flood_event(run, n) for n in range(FLOOD)]
        landed = await produce(
            kafka_bootstrap,
            topic,
            [
                Record(f"{run}-t{n}".encode(), encode(e), CLOUDEVENT_HEADERS)
                for n, e in enumerate(events)
            ],
        )
        assert len({partition for partition, _ in landed}) > 1

        await smtp_server.wait_for(LIMIT, timeout=60)
        letters = await read_topic(
            kafka_bootstrap, f"{topic}.dlq", at_least=FLOOD - LIMIT, within=60
        )
        assert await settle(lambda: len(smtp_server.messages)) == LIMIT
        # Counted per address, whatever its case: one recipient.
        assert {r.lower() for m in smtp_server.messages for r in m.rcpt_tos} == {
            "dana@customer.test"
        }
        assert [d.header("x-error-stage") for d in letters] == ["throttled"] * (FLOOD - LIMIT)
        # The limit held across instances, not within one: more than one of them served
        # (sent or held back) part of the flood.
        served = [outcomes(s) for s in services]
        taking_part = [o for o in served if o.get("sent", 0) + o.get("throttled", 0) > 0]
        assert len(taking_part) > 1, served
        assert sum(o.get("sent", 0) for o in served) == LIMIT, served
        assert sum(o.get("throttled", 0) for o in served) == FLOOD - LIMIT, served

        # `notifier dlq replay --stage throttled` releases each held mail once, whichever
        # instance reads it.
        done = await asyncio.to_thread(
            run_notifier, "dlq", "replay", "--stage", "throttled", env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert f"replayed {FLOOD - LIMIT} dead letter(s)" in done.stdout
        await smtp_server.wait_for(FLOOD, timeout=60)
        assert await settle(lambda: len(smtp_server.messages)) == FLOOD
        ids = {m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in smtp_server.messages}
        assert len(ids) == FLOOD
    finally:
        await asyncio.gather(*(asyncio.to_thread(s.stop, 15) for s in services))
