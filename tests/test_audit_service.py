"""The audit of a real `notifier run`: an event published on the real broker, its mail
received by a real SMTP server, then GET /deliveries without a token, with a wrong one and
with the right one; the rows must match the mail that arrived."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.config import service_env
from devkit.events import example, publish
from devkit.process import ServiceProcess, free_port
from devkit.smtp import SmtpRecorder
from tests.audit_support import TOKEN

pytestmark = pytest.mark.integration

DANA = "dana@customer.test"
BOB = "bob@helpdesk.test"
BILLING = "billing@helpdesk.test"
DRUCKHAUS = "service@druckhaus.test"


async def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_the_audit_of_a_real_run_matches_the_mail_that_arrived(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> None:
    # Ticket 1042 (T-1042 in the directory): the customer's mail and bob's staff mail go
    # out; the billing mailbox answers 550 (failed, dead-lettered); the supplier's mail is
    # withheld (personal data); one department token is unknown.
    event = example(
        "07-supplier-personal-data.json",
        sendContentByEmail="Yes",
        activityDepartments="billing; no-such-department",
        activityUsers="bob",
    )
    smtp_server.fail_rcpt(BILLING)
    env = service_env(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        http_token=TOKEN,
    )
    service = ServiceProcess(env, free_port(), log_path=tmp_path / "service.log")
    await asyncio.to_thread(service.start, 60)
    try:
        await publish(kafka_bootstrap, topic, [event])
        await smtp_server.wait_for(2, timeout=60)
        received = {
            m.rcpt_tos: message_from_bytes(m.data)["Message-ID"] for m in smtp_server.messages
        }
        assert set(received) == {(DANA,), (BOB,)}

        url = f"{service.base_url}/deliveries"
        params = {"ticket": "1042"}
        right = {"Authorization": f"Bearer {TOKEN}"}

        def recorded(*wanted: tuple[str, str]) -> Callable[[], list[dict[str, Any]] | None]:
            def check() -> list[dict[str, Any]] | None:
                response = httpx.get(url, params=params, headers=right, timeout=10)
                assert response.status_code == 200, response.text
                rows: list[dict[str, Any]] = response.json()["deliveries"]
                done = {(r["recipient"], r["status"]) for r in rows}
                return rows if set(wanted) <= done else None

            return check

        sends = ((DANA, "sent"), (BOB, "sent"), (BILLING, "failed"))
        rows = await poll(recorded(*sends), 30, "the sent and failed rows")

        without = await asyncio.to_thread(httpx.get, url, params=params, timeout=10)
        wrong = await asyncio.to_thread(
            httpx.get, url, params=params, headers={"Authorization": "Bearer nope"}, timeout=10
        )
        for refused in (without, wrong):
            assert refused.status_code == 401
            assert refused.json() == {"error": "unauthorized"}
            assert DANA not in refused.text
        for path in ("/healthz", "/metrics"):
            assert (await asyncio.to_thread(service.get, path)).status_code == 200
        metrics = await asyncio.to_thread(service.metrics_text)
        assert re.search(
            r'notifier_audit_denied_total\{endpoint="deliveries",reason="wrong"\} 1\.0', metrics
        )

        by_recipient = {r["recipient"]: r for r in rows}
        assert all(r["ticket"] == "1042" and r["activity"] == "5006" for r in rows)
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["at"]) for r in rows)
        assert [r["at"] for r in rows] == sorted((r["at"] for r in rows), reverse=True)
        for (recipient,), message_id in received.items():
            row = by_recipient[recipient]
            assert (row["status"], row["message_id"], row["reason"]) == ("sent", message_id, None)
        assert by_recipient[DANA]["kind"] == "customer_content"
        assert by_recipient[BOB]["kind"] == "staff"
        failed = by_recipient[BILLING]
        assert (failed["kind"], failed["status"]) == ("staff", "failed")
        assert failed["reason"].startswith("smtp: ")
        assert "550" in failed["reason"]

        letters = await asyncio.to_thread(
            httpx.get, f"{service.base_url}/dead-letters", params=params, headers=right
        )
        [letter] = letters.json()["dead_letters"]
        assert (letter["topic"], letter["stage"]) == (topic, "smtp")

        # The rows the dispatcher records for what it does not send (contract section 8):
        # the withheld supplier and the unresolved token, beside the mail that went out.
        unsent = ((DRUCKHAUS, "withheld"), ("no-such-department", "unresolved"))
        rows = await poll(recorded(*sends, *unsent), 10, "the withheld and unresolved rows")
        by_recipient = {r["recipient"]: r for r in rows}
        assert by_recipient[DRUCKHAUS]["status"] == "withheld"
        assert by_recipient[DRUCKHAUS]["kind"] == "supplier"
        assert by_recipient["no-such-department"]["status"] == "unresolved"
        assert len(rows) == 5

        # The page, found by the reference the dispatcher stored with the ticket.
        async with httpx.AsyncClient(base_url=service.base_url) as http:
            login = await http.post("/ui/login", data={"token": TOKEN})
            assert login.status_code == 303
            page = await http.get("/ui/", params={"q": "T-1042"})
        assert page.status_code == 200
        for shown in (DANA, BOB, BILLING, DRUCKHAUS, "no-such-department", "dead letter"):
            assert shown in page.text, shown
    finally:
        await asyncio.to_thread(service.stop, 30)
