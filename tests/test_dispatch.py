"""The dispatcher with fakes at its edges: what is sent, recorded, retried and dead-lettered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from service.core.directory import Directory
from service.core.failures import Failure
from service.core.mime import AddressError
from service.delivery.build import InlineBuilder, MailBuilder, MailSpec
from service.delivery.config import DeliveryConfig
from service.delivery.dead_letters import Record, RetryLater
from service.delivery.dispatch import Dispatcher
from service.delivery.ledger import DeliveryQuery, Key
from service.delivery.ledger.sqlite import SqliteLedger
from service.delivery.smtp import PermanentSmtpError, TransientSmtpError
from service.delivery.workers import PooledBuilder, WorkerPool
from service.runtime.metrics import Metrics
from service.runtime.settings import default_templates_dir

CUSTOMER = "dana@customer.test"


class FakeMailer:
    """Accepts everything unless told otherwise; keeps what it accepted."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, bytes]] = []
        self.permanent: set[str] = set()
        self.transient_left = 0
        self.always_transient = False

    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Any = None,
        ready: Any = None,
    ) -> None:
        if ready is not None:  # as the pool does, with a connection in hand
            await ready()
        await asyncio.sleep(0)
        if recipient in self.permanent:
            raise PermanentSmtpError(550, "no such user")
        if self.always_transient:
            raise TransientSmtpError("421 try later")
        if self.transient_left > 0:
            self.transient_left -= 1
            raise TransientSmtpError("451 busy")
        self.accepted.append((recipient, message))


class FakeDeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[Record, str, str]] = []

    async def send(self, record: Record, failure: Failure) -> None:
        self.sent.append((record, failure.stage, failure.reason))


def activity(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "5001",
        "ticketID": "1042",
        "sendContentByEmail": "Yes",
        "activityText": "Your printer is fixed.",
    }
    base.update(fields)
    return base


def event_bytes(act: dict[str, Any], *, type_: str = "ticketActivity.created") -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": f"ev-{act['id']}-{type_}",
            "source": "/backend/api/v1/ticketActivities",
            "type": type_,
            "subject": act["ticketID"],
            "time": "2026-11-27T09:15:00Z",
            "datacontenttype": "application/json",
            "data": {
                "activity": act,
                "ticket": {
                    "id": act["ticketID"],
                    "reference": f"T-{act['ticketID']}",
                    "subject": "Printer on floor 3 jams",
                    "customer": {"name": "Dana Smith", "email": CUSTOMER, "locale": "de"},
                },
            },
        }
    ).encode()


_offsets = iter(range(10**9))


def record(value: bytes | None, key: bytes = b"1042", partition: int = 0) -> Record:
    return Record("t", partition, next(_offsets), key, value, (), int(time.time() * 1000))


def mail_spec(store_dir: Path) -> MailSpec:
    return MailSpec(
        templates_dir=default_templates_dir(),
        attachments_dir=store_dir,
        max_attachment_bytes=10_000_000,
        max_mail_bytes=20_000_000,
        sender="Helpdesk <helpdesk@helpdesk.test>",
        reply_to=None,
        domain="helpdesk.test",
    )


class Rig:
    """A dispatcher with fakes around it; `workers` starts a pool of its own, `pool` lends one."""

    def __init__(
        self,
        tmp_path: Path,
        workers: int = 0,
        *,
        pool: WorkerPool | None = None,
        **config: Any,
    ) -> None:
        self.mailer = FakeMailer()
        self.dlq = FakeDeadLetters()
        self.ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
        self.metrics = Metrics(CollectorRegistry())
        (tmp_path / "store").mkdir(exist_ok=True)
        self.store_dir = tmp_path / "store"
        defaults: dict[str, Any] = {
            "envelope_from": "helpdesk@helpdesk.test",
            "domain": "helpdesk.test",
            "retry_initial": 0.001,
            "retry_max": 0.01,
            "retry_budget": 2.0,
        }
        defaults.update(config)
        spec = mail_spec(self.store_dir)
        self.factory = spec.factory()
        self._inline = InlineBuilder(self.factory)
        # Mails with attachments are built inline, from this rig's store; a lent pool only
        # ever builds the others.
        self._own_pool = WorkerPool(spec, workers) if workers else None
        lent = pool or self._own_pool
        self.builder: MailBuilder = PooledBuilder(lent, self._inline) if lent else self._inline
        self.dispatcher = Dispatcher(
            config=DeliveryConfig(**defaults),
            directory=Directory.empty(),
            builder=self.builder,
            ledger=self.ledger,
            mailer=self.mailer,
            dead_letters=self.dlq,
            metrics=self.metrics,
        )

    async def open(self) -> None:
        await self.ledger.open()
        if self._own_pool is not None:
            await self._own_pool.start()

    async def close(self) -> None:
        await self.ledger.close()
        self._inline.close()
        if self._own_pool is not None:
            self._own_pool.close()

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture(scope="module")
async def worker_pool(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkerPool]:
    """One pool of one worker process for every [workers] rig of this module: a worker takes
    longer to start than most tests here take to run. (Mails with attachments are built in
    the service's process, never in the pool, so the pool's store is never read.)"""
    pool = WorkerPool(mail_spec(tmp_path_factory.mktemp("pool-store")), 1)
    await pool.start()
    yield pool
    pool.close()


@pytest.fixture(params=[0, 1], ids=["inline", "workers"])
async def make_rig(
    request: pytest.FixtureRequest, tmp_path: Path, worker_pool: WorkerPool
) -> AsyncIterator[MakeRig]:
    """Rigs that build mails in process, or in the module's pool of one worker process."""
    rigs: list[Rig] = []
    pool = worker_pool if request.param else None

    async def make(**config: Any) -> Rig:
        r = Rig(tmp_path, pool=pool, **config)
        await r.open()
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        await r.close()


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    return await make_rig()


@pytest.fixture
async def inline_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    await r.open()
    yield r
    await r.close()


async def test_good_event_sends_one_mail_and_records_it(rig: Rig) -> None:
    await rig.dispatcher.handle_batch([record(event_bytes(activity()))])
    assert [to for to, _ in rig.mailer.accepted] == [CUSTOMER]
    assert await rig.ledger.sent([Key("5001", "customer_content", CUSTOMER)])
    assert rig.count("notifier_notifications_total", kind="customer_content", outcome="sent") == 1
    assert rig.dlq.sent == []


async def test_redelivery_sends_nothing_twice(rig: Rig) -> None:
    value = event_bytes(activity())
    await rig.dispatcher.handle_batch([record(value)])
    await rig.dispatcher.handle_batch([record(value)])
    assert len(rig.mailer.accepted) == 1
    assert (
        rig.count(
            "notifier_notifications_total", kind="customer_content", outcome="skipped_duplicate"
        )
        == 1
    )


async def test_update_sends_only_what_was_not_sent(rig: Rig) -> None:
    first = activity(updateText="Technician booked.", sendUpdateByEmail="No")
    await rig.dispatcher.handle_batch([record(event_bytes(first))])
    edited = activity(
        activityText="Edited text", updateText="Technician booked.", sendUpdateByEmail="Yes"
    )
    await rig.dispatcher.handle_batch([record(event_bytes(edited, type_="ticketActivity.updated"))])
    kinds = [message for _, message in rig.mailer.accepted]
    assert len(kinds) == 2
    assert b"Edited text" not in kinds[1]


@pytest.mark.parametrize(
    ("value", "stage"),
    [
        (b"not json", "decode"),
        (b'{"hello": "world"}', "cloudevent"),
        (
            event_bytes(activity()).replace(b"ticketActivity.created", b"ticketActivity.deleted"),
            "type",
        ),
        (event_bytes(activity(sendContentByEmail="maybe")), "activity"),
    ],
)
async def test_poison_goes_to_dead_letters_and_the_batch_goes_on(
    rig: Rig, value: bytes, stage: str
) -> None:
    good = activity(id="6000")
    await rig.dispatcher.handle_batch([record(value, key=b"x"), record(event_bytes(good))])
    assert [(s) for _, s, _ in rig.dlq.sent] == [stage]
    assert len(rig.mailer.accepted) == 1
    assert rig.count("notifier_dead_letters_total", stage=stage) == 1


async def test_dead_lettered_record_is_not_dead_lettered_again(rig: Rig) -> None:
    poison = record(b"{{{")
    await rig.dispatcher.handle_batch([poison])
    await rig.dispatcher.handle_batch([poison])
    assert len(rig.dlq.sent) == 1


async def test_permanent_failure_spares_the_other_recipients(rig: Rig) -> None:
    act = activity(activityUsers="alice@helpdesk.test, bob@helpdesk.test")
    rig.mailer.permanent.add("alice@helpdesk.test")
    await rig.dispatcher.handle_batch([record(event_bytes(act))])
    assert sorted(to for to, _ in rig.mailer.accepted) == ["bob@helpdesk.test", CUSTOMER]
    [(_, stage, reason)] = rig.dlq.sent
    assert stage == "smtp"
    assert "550" in reason
    assert "alice" not in reason
    [row] = await rig.ledger.deliveries(
        DeliveryQuery(activity="5001", recipient="alice@helpdesk.test")
    )
    assert (row.status, row.stage) == ("failed", "smtp")


async def test_transient_failures_are_retried(rig: Rig) -> None:
    rig.mailer.transient_left = 3
    await rig.dispatcher.handle_batch([record(event_bytes(activity()))])
    assert len(rig.mailer.accepted) == 1
    assert rig.count("notifier_retries_total") == 3


async def test_outage_beyond_the_budget_asks_for_a_rewind(make_rig: MakeRig) -> None:
    r = await make_rig(retry_budget=0.05)
    r.mailer.always_transient = True
    with pytest.raises(RetryLater):
        await r.dispatcher.handle_batch([record(event_bytes(activity()))])
    assert not await r.ledger.sent([Key("5001", "customer_content", CUSTOMER)])
    r.mailer.always_transient = False
    await r.dispatcher.handle_batch([record(event_bytes(activity()))])
    assert len(r.mailer.accepted) == 1


async def test_stop_abandons_retries_at_once(make_rig: MakeRig) -> None:
    r = await make_rig(retry_initial=5.0, retry_max=5.0, retry_budget=60.0)
    r.mailer.always_transient = True
    task = asyncio.create_task(r.dispatcher.handle_batch([record(event_bytes(activity()))]))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    r.dispatcher.stop()
    with pytest.raises(RetryLater):
        await task
    assert time.monotonic() - started < 1.0


async def test_missing_attachment_waits_then_dead_letters(make_rig: MakeRig) -> None:
    r = await make_rig(attachment_wait=0.0)
    act = activity(invoiceAttachments="invoices/INV-1.pdf")
    await r.dispatcher.handle_batch([record(event_bytes(act))])
    assert r.mailer.accepted == []
    [(_, stage, _)] = r.dlq.sent
    assert stage == "attachment"


async def test_missing_attachment_within_the_wait_is_retried_later(make_rig: MakeRig) -> None:
    r = await make_rig(attachment_wait=3600.0, retry_budget=0.05)
    act = activity(invoiceAttachments="invoices/INV-1.pdf")
    with pytest.raises(RetryLater):
        await r.dispatcher.handle_batch([record(event_bytes(act))])
    (r.store_dir / "invoices").mkdir()
    (r.store_dir / "invoices" / "INV-1.pdf").write_bytes(b"%PDF-1.4 invoice")
    await r.dispatcher.handle_batch([record(event_bytes(act))])
    [(_, message)] = r.mailer.accepted
    assert b"INV-1.pdf" in message
    assert r.dlq.sent == []


async def test_attachment_outside_the_store_is_refused(rig: Rig) -> None:
    act = activity(standardTicketAttachments="../../etc/passwd")
    await rig.dispatcher.handle_batch([record(event_bytes(act))])
    assert rig.mailer.accepted == []
    assert [stage for _, stage, _ in rig.dlq.sent] == ["attachment"]


async def test_one_ticket_is_served_in_order(rig: Rig) -> None:
    records = [
        record(event_bytes(activity(id=str(7000 + i), activityText=f"step {i}"))) for i in range(20)
    ]
    await rig.dispatcher.handle_batch(records)
    ids = [
        message.split(b"Message-ID:", 1)[1].split(b"\r\n", 1)[0]
        for _, message in rig.mailer.accepted
    ]
    assert len(ids) == 20
    for i, header in enumerate(ids):
        assert str(7000 + i).encode() in header


async def test_address_routing_cannot_use_is_unresolved(rig: Rig) -> None:
    act = activity(activityUsers="ü@helpdesk.test, bob@helpdesk.test")
    await rig.dispatcher.handle_batch([record(event_bytes(act))])
    assert sorted(to for to, _ in rig.mailer.accepted) == ["bob@helpdesk.test", CUSTOMER]
    assert rig.count("notifier_notifications_total", kind="unknown", outcome="unresolved") == 1
    assert rig.dlq.sent == []


async def test_address_no_header_can_carry_is_dead_lettered(
    inline_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Routing already refuses such addresses; this is the dispatcher's second line.
    # In process only: a worker process would not see the patched function.
    rig = inline_rig
    import service.delivery.build

    real = service.delivery.build.build_message

    def build(n: Any, *args: Any, **kwargs: Any) -> bytes:
        if n.recipient.email == "bob@helpdesk.test":
            raise AddressError("not an e-mail address")
        return real(n, *args, **kwargs)

    monkeypatch.setattr(service.delivery.build, "build_message", build)
    act = activity(activityUsers="bob@helpdesk.test")
    await rig.dispatcher.handle_batch([record(event_bytes(act))])
    assert [to for to, _ in rig.mailer.accepted] == [CUSTOMER]
    assert [stage for _, stage, _ in rig.dlq.sent] == ["address"]


async def test_created_and_updated_in_one_batch_send_once(rig: Rig) -> None:
    created = event_bytes(activity())
    updated = event_bytes(activity(activityText="edited"), type_="ticketActivity.updated")
    await rig.dispatcher.handle_batch([record(created), record(updated)])
    assert len(rig.mailer.accepted) == 1
    assert b"edited" not in rig.mailer.accepted[0][1]


async def test_many_records_of_one_ticket_keep_their_order_across_chunks(rig: Rig) -> None:
    # 150 mails: several chunks when a worker pool builds them.
    records = [
        record(event_bytes(activity(id=str(8000 + i), activityText=f"step {i}")))
        for i in range(150)
    ]
    await rig.dispatcher.handle_batch(records)
    ids = [
        message.split(b"Message-ID:", 1)[1].split(b"\r\n", 1)[0]
        for _, message in rig.mailer.accepted
    ]
    assert [int(header.split(b".")[1]) for header in ids] == list(range(8000, 8150))


@contextlib.asynccontextmanager
async def one_worker_rig(tmp_path: Path) -> AsyncIterator[tuple[Rig, BaseProcess, set[int | None]]]:
    """A rig whose pool has one worker: the rig, that worker, and the children from before."""
    others = {child.pid for child in multiprocessing.active_children()}
    r = Rig(tmp_path, workers=1)
    await r.open()
    try:
        [worker] = [c for c in multiprocessing.active_children() if c.pid not in others]
        assert worker.pid is not None
        yield r, worker, others | {worker.pid}
    finally:
        await r.close()


def _new_children(others: set[int | None]) -> list[int | None]:
    return [c.pid for c in multiprocessing.active_children() if c.pid not in others]


async def test_a_worker_dying_under_a_chunk_rewinds_the_batch_and_is_replaced(
    tmp_path: Path,
) -> None:
    async with one_worker_rig(tmp_path) as (r, worker, before):
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGSTOP)  # its chunk waits in the socket, never answered
        value = event_bytes(activity())
        batch = asyncio.create_task(r.dispatcher.handle_batch([record(value)]))
        await asyncio.sleep(0.5)
        assert not batch.done()
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(RetryLater):
            await asyncio.wait_for(batch, 10)
        assert r.mailer.accepted == []
        await r.dispatcher.handle_batch([record(value)])
        assert [to for to, _ in r.mailer.accepted] == [CUSTOMER]
        assert len(_new_children(before)) == 1  # its replacement


async def test_a_worker_that_died_idle_is_replaced_before_a_batch_needs_it(
    tmp_path: Path,
) -> None:
    async with one_worker_rig(tmp_path) as (r, worker, before):
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        await asyncio.to_thread(worker.join, 10)
        await asyncio.sleep(0.2)  # a turn or two of the loop: it reads the socket's end
        await r.dispatcher.handle_batch([record(event_bytes(activity()))])
        assert [to for to, _ in r.mailer.accepted] == [CUSTOMER]
        assert _new_children(before)  # its replacement


async def test_with_workers_every_mail_is_built_by_a_worker(
    tmp_path: Path,
) -> None:
    r = Rig(tmp_path, workers=1)
    await r.open()
    try:
        (r.store_dir / "manual.pdf").write_bytes(b"%PDF-1.4 manual")
        rendered_here: list[str] = []
        assembled_here: list[str] = []
        render, assemble = r.factory.render, r.factory.assemble

        def spy_render(n: Any) -> Any:
            rendered_here.append(n.kind.value)
            return render(n)

        def spy_assemble(n: Any, *args: Any) -> Any:
            assembled_here.append(n.kind.value)
            return assemble(n, *args)

        r.factory.render = spy_render  # type: ignore[method-assign]
        r.factory.assemble = spy_assemble  # type: ignore[method-assign]
        act = activity(
            standardTicketAttachments="manual.pdf",
            activityUsers="bob@helpdesk.test",
            updateText="Booked.",
            sendUpdateByEmail="Yes",
        )
        await r.dispatcher.handle_batch([record(event_bytes(act))])
        assert sorted(to for to, _ in r.mailer.accepted) == [
            "bob@helpdesk.test",
            CUSTOMER,
            CUSTOMER,
        ]
        # Every mail is built by the worker, the customer's content mail with its file.
        assert rendered_here == []
        assert assembled_here == []
    finally:
        await r.close()
