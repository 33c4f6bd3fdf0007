"""The dispatcher on a shared ledger: claims and leases, the audit rows, history, the limit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from service.delivery.dead_letters import Record, RetryLater
from service.delivery.dispatch import REPLAYED_STAGE
from service.delivery.ledger import ClaimRequest, DeliveryQuery, Entry, Key, Status
from tests.test_dispatch import CUSTOMER, FakeMailer, Rig, activity, event_bytes, record

HOUR = 3600.0


async def rig_with(tmp_path: Path, **config: Any) -> Rig:
    r = Rig(tmp_path, **config)
    await r.open()
    return r


async def test_every_outcome_is_recorded_with_its_ticket(tmp_path: Path) -> None:
    r = await rig_with(tmp_path)
    try:
        act = activity(
            activityUsers="ghost, bob@helpdesk.test",
            activitySuppliers="orders@acme.test",
            containsPersonalData="Yes",
        )
        await r.dispatcher.handle_batch([record(event_bytes(act))])
        rows = await r.ledger.deliveries(DeliveryQuery(ticket="1042"))
        by = {(row.key.kind, row.key.recipient): row for row in rows}
        assert by[("customer_content", CUSTOMER)].status == Status.SENT
        assert by[("customer_content", CUSTOMER)].message_id
        assert by[("staff", "bob@helpdesk.test")].status == Status.SENT
        assert by[("supplier", "orders@acme.test")].status == Status.WITHHELD
        unresolved = by[("staff", "ghost")]
        assert unresolved.status == Status.UNRESOLVED
        assert unresolved.reason == "activityUsers: not in the directory"
        assert {row.event_id for row in rows} == {"ev-5001-ticketActivity.created"}
        assert await r.ledger.tickets_by_reference("T-1042") == ["1042"]
    finally:
        await r.close()


async def test_history_mails_nobody_and_is_recorded_expired(tmp_path: Path) -> None:
    r = await rig_with(tmp_path, history_grace=HOUR)
    try:
        first = await r.ledger.first_start("ticket-notifier", time.time())
        week_old = Record(
            "t", 0, 1, b"1042", event_bytes(activity()), (), int((first - 7 * 24 * HOUR) * 1000)
        )
        fresh = Record(
            "t",
            0,
            2,
            b"1043",
            event_bytes(activity(id="6001", ticketID="1043")),
            (),
            int(time.time() * 1000),
        )
        await r.dispatcher.handle_batch([week_old, fresh])
        assert [to for to, _ in r.mailer.accepted] == [CUSTOMER]
        [old] = await r.ledger.deliveries(DeliveryQuery(activity="5001"))
        assert (old.status, old.reason) == (Status.EXPIRED, "history")
        [new] = await r.ledger.deliveries(DeliveryQuery(activity="6001"))
        assert new.status == Status.SENT
        assert (
            r.count("notifier_notifications_total", kind="customer_content", outcome="expired") == 1
        )
    finally:
        await r.close()


async def test_an_outage_longer_than_the_grace_still_delivers(tmp_path: Path) -> None:
    # The record came after the group's first start: however late it is read, it is mail.
    r = await rig_with(tmp_path, history_grace=60.0)
    try:
        await r.ledger.first_start("ticket-notifier", time.time() - 3 * 24 * HOUR)
        late = Record(
            "t",
            0,
            1,
            b"1042",
            event_bytes(activity()),
            (),
            int((time.time() - 2 * 24 * HOUR) * 1000),
        )
        await r.dispatcher.handle_batch([late])
        assert [to for to, _ in r.mailer.accepted] == [CUSTOMER]
    finally:
        await r.close()


async def test_the_limit_throttles_and_a_replay_releases_each_mail_once(tmp_path: Path) -> None:
    r = await rig_with(tmp_path, recipient_limit=3)
    try:
        records = [record(event_bytes(activity(id=str(7000 + i))), key=b"1042") for i in range(5)]
        await r.dispatcher.handle_batch(records)
        assert len(r.mailer.accepted) == 3
        held = [(rec, stage) for rec, stage, _ in r.dlq.sent]
        assert [stage for _, stage in held] == ["throttled", "throttled"]
        throttled = await r.ledger.deliveries(DeliveryQuery(status=Status.THROTTLED))
        assert len(throttled) == 2
        assert (
            r.count("notifier_notifications_total", kind="customer_content", outcome="throttled")
            == 2
        )
        # `notifier dlq replay --stage throttled` sends them back marked with their stage.
        replayed = [
            Record("t", 0, 100 + i, rec.key, rec.value, ((REPLAYED_STAGE, b"throttled"),))
            for i, (rec, _) in enumerate(held)
        ]
        await r.dispatcher.handle_batch(replayed)
        assert len(r.mailer.accepted) == 5
        # A second replay of the same dead letters sends nothing again.
        again = [
            Record("t", 0, 200 + i, rec.key, rec.value, rec.headers)
            for i, rec in enumerate(replayed)
        ]
        await r.dispatcher.handle_batch(again)
        assert len(r.mailer.accepted) == 5
        # An ordinary new mail to the address is still over the limit.
        await r.dispatcher.handle_batch([record(event_bytes(activity(id="7999")))])
        assert len(r.mailer.accepted) == 5
    finally:
        await r.close()


async def test_a_key_another_instance_holds_is_waited_for_and_skipped_once_sent(
    tmp_path: Path,
) -> None:
    r = await rig_with(tmp_path, retry_budget=10.0, retry_initial=0.05, retry_max=0.2)
    try:
        key = Key("5001", "customer_content", CUSTOMER)
        await r.ledger.claim([ClaimRequest(key, "1042")], "other-instance", 30.0, 0)

        async def other_finishes() -> None:
            await asyncio.sleep(0.5)
            await r.ledger.record(Entry(key, Status.SENT, "<a.5001@x>", ticket_id="1042"))

        finishing = asyncio.create_task(other_finishes())
        await r.dispatcher.handle_batch([record(event_bytes(activity()))])
        await finishing
        assert r.mailer.accepted == []
        assert (
            r.count(
                "notifier_notifications_total", kind="customer_content", outcome="skipped_duplicate"
            )
            == 1
        )
    finally:
        await r.close()


async def test_a_key_held_past_the_budget_rewinds_and_sends_nothing(tmp_path: Path) -> None:
    r = await rig_with(tmp_path, retry_budget=0.5, retry_initial=0.05, retry_max=0.1)
    try:
        key = Key("5001", "customer_content", CUSTOMER)
        await r.ledger.claim([ClaimRequest(key, "1042")], "other-instance", 30.0, 0)
        with pytest.raises(RetryLater):
            await r.dispatcher.handle_batch([record(event_bytes(activity()))])
        assert r.mailer.accepted == []
    finally:
        await r.close()


class StallingMailer(FakeMailer):
    """Freezes mid-transaction for `stall` seconds, like an instance that was SIGSTOPped
    between the start of DATA and its end, then asks `may_finish` as the server would."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall
        self.withheld = 0

    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Any = None,
        ready: Any = None,
    ) -> None:
        from service.delivery.smtp_wire import Withheld

        if ready is not None:
            await ready()
        if self.stall:
            await asyncio.sleep(self.stall)
            self.stall = 0
            if may_finish is not None and not may_finish():
                self.withheld += 1
                raise Withheld
        await super().send(sender, recipient, message)


async def test_a_send_that_outlives_its_lease_is_not_finished_when_another_took_over(
    tmp_path: Path,
) -> None:
    # The zombie: its lease ends while it is frozen; another instance claims the key and
    # sends it. Waking, the zombie must drop its mail unfinished and skip the key.
    r = await rig_with(tmp_path, lease_seconds=1.0, retry_initial=0.05, retry_max=0.1)
    r.dispatcher._sender._mailer = r.mailer = StallingMailer(stall=1.5)  # type: ignore[assignment]
    try:
        key = Key("5001", "customer_content", CUSTOMER)

        async def take_over() -> None:
            await asyncio.sleep(1.2)  # past the zombie's lease
            claims = await r.ledger.claim([ClaimRequest(key, "1042")], "new-owner", 30.0, 0)
            assert claims[key] == "won"
            await r.ledger.record(Entry(key, Status.SENT, "<a.5001@x>", ticket_id="1042"))

        taking = asyncio.create_task(take_over())
        await r.dispatcher.handle_batch([record(event_bytes(activity()))])
        await taking
        assert r.mailer.withheld == 1
        assert r.mailer.accepted == []  # only the new owner's mail went out
    finally:
        await r.close()


async def test_a_send_that_outlives_its_lease_is_renewed_when_nobody_took_over(
    tmp_path: Path,
) -> None:
    r = await rig_with(tmp_path, lease_seconds=1.0, retry_initial=0.05, retry_max=0.1)
    r.dispatcher._sender._mailer = r.mailer = StallingMailer(stall=1.2)  # type: ignore[assignment]
    try:
        await r.dispatcher.handle_batch([record(event_bytes(activity()))])
        assert r.mailer.withheld == 1
        assert [to for to, _ in r.mailer.accepted] == [CUSTOMER]
    finally:
        await r.close()


class QueueingMailer(FakeMailer):
    """Waits `queue` seconds for a connection, then (with it in hand, after `ready`) takes
    `reply` seconds for the server to answer the end of DATA, like a busy pool and a slow
    server; `during` runs while the server holds the mail."""

    def __init__(self, queue: float, reply: float, during: Any) -> None:
        super().__init__()
        self.queue, self.reply, self.during = queue, reply, during
        self.seen: list[str] = []

    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Any = None,
        ready: Any = None,
    ) -> None:
        await asyncio.sleep(self.queue)
        if ready is not None:
            await ready()
        assert may_finish is None or may_finish()
        answer = asyncio.create_task(asyncio.sleep(self.reply))
        self.seen.append(await self.during())
        await answer
        await super().send(sender, recipient, message)


async def test_the_lease_is_renewed_with_a_connection_in_hand(tmp_path: Path) -> None:
    # A mail that waited most of its lease for a connection: had the lease been taken
    # before that wait, it would end while the server holds the mail, and another instance
    # could claim and send it again. Renewed with the connection in hand, it still runs.
    r = await rig_with(tmp_path, lease_seconds=1.0, retry_initial=0.05, retry_max=0.1)
    key = Key("5001", "customer_content", CUSTOMER)

    async def another_instance_claims() -> str:
        await asyncio.sleep(0.3)  # 1.1 s after the batch's claim: its first lease is over
        claims = await r.ledger.claim([ClaimRequest(key, "1042")], "other", 30.0, 0)
        return str(claims[key])

    r.dispatcher._sender._mailer = r.mailer = QueueingMailer(0.8, 0.5, another_instance_claims)  # type: ignore[assignment]
    try:
        await r.dispatcher.handle_batch([record(event_bytes(activity()))])
        assert r.mailer.seen == ["held"]
        assert [to for to, _ in r.mailer.accepted] == [CUSTOMER]
    finally:
        await r.close()


class SlowMailer(FakeMailer):
    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Any = None,
        ready: Any = None,
    ) -> None:
        await asyncio.sleep(0.05)
        await super().send(sender, recipient, message, may_finish, ready)


async def test_two_instances_serving_the_same_records_send_each_mail_once(
    tmp_path: Path,
) -> None:
    # Both read the same records (a partition that moved while the old owner still ran):
    # the claims let exactly one of them send each notification.
    first = await rig_with(tmp_path, retry_initial=0.02, retry_max=0.05)
    second = await rig_with(tmp_path, retry_initial=0.02, retry_max=0.05)
    mailer = SlowMailer()
    for r in (first, second):
        r.dispatcher._sender._mailer = mailer  # type: ignore[assignment]
    try:
        records = [
            record(event_bytes(activity(id=str(8000 + i), activityUsers="bob@helpdesk.test")))
            for i in range(20)
        ]
        await asyncio.gather(
            first.dispatcher.handle_batch(records), second.dispatcher.handle_batch(records)
        )
        sent = [to for to, _ in mailer.accepted]
        assert len(sent) == 40  # 20 activities x (customer, bob), none twice
        ids = [m.split(b"Message-ID: ")[1].split(b"\r\n")[0] for _, m in mailer.accepted]
        assert len(set(ids)) == 40
    finally:
        await first.close()
        await second.close()
