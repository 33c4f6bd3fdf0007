"""Fault injection on the real broker, a controllable SMTP server and `notifier run` as a child.

Each case publishes good events whose mails are known in advance (and sometimes poison),
injects one kind of fault while the service works through them, then counts the mail the
SMTP server accepted by Message-ID and reads the dead-letter topic. Every case must end with
0 lost and 0 duplicated good mails (SIGKILL: no more duplicates than mails in flight at the
kills, each with its original Message-ID), every poison dead-lettered once, and the service
still consuming. The short version runs in CI; NOTIFY_FAULTS_FULL=1 (scripts/faults) runs
each case over at least 1,000 notifications with the long outages. The report table goes
to benchmarks/out/faults[-short].{md,json}.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devkit.process import ServiceProcess, free_port, run_notifier
from devkit.smtp import SmtpRecorder
from devkit.topics import (
    KafkaRecord,
    group_caught_up,
    group_members,
    read_topic,
    set_topic_config,
)
from devkit.waiting import poll
from tests.faults.harness import (
    FULL,
    SEED,
    CaseReport,
    EventFactory,
    MailIndex,
    Outgoing,
    Published,
    assert_clean,
    case_report,
    expected_message_ids,
    interleave,
    largest_value,
    ledger_sent_ids,
    origin,
    poison_messages,
    print_module_report,
    publish,
    scaled,
    service_env,
    wait_for_dead_letters,
    wait_for_mail,
)

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(1500 if FULL else 240),
]

NOTIFICATIONS = scaled(150, 1200)  # per case
SMTP_DELAY = scaled(200, 100) / 1000  # seconds the SMTP server takes per message
DELIVERY_WITHIN = scaled(120, 600)  # seconds for a case's mail to arrive after its fault
STALL = scaled(40, 90)  # seconds without any new mail after which waiting is pointless
PROBES = 5  # events published after the fault: the service must still consume them

REPORTS: list[CaseReport] = []
SUITE_STARTED = time.monotonic()


@pytest.fixture(scope="module", autouse=True)
def fault_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: write benchmarks/out/faults[-short].{md,json}, print the table."""
    yield
    print_module_report(request, REPORTS, SUITE_STARTED, "single instance", "Fault suite")


@dataclass
class FaultRun:
    """One case: its topic, SMTP server, service process, events and what was published."""

    case: str
    bootstrap: str
    topic: str
    smtp: SmtpRecorder
    service: ServiceProcess
    ledger: Path
    rng: random.Random
    factory: EventFactory
    index: MailIndex
    env: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    published: list[Published] = field(default_factory=list)
    also_expected: set[str] = field(default_factory=set)
    dead_letters: list[KafkaRecord] = field(default_factory=list)  # as finish() read them

    @property
    def dlq(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def group(self) -> str:
        return f"{self.topic}-notifier"

    @property
    def expected(self) -> frozenset[str]:
        return frozenset(self.also_expected).union(*(p.record.expected for p in self.published))

    async def publish(self, records: Sequence[Outgoing]) -> list[Published]:
        done = await publish(self.bootstrap, self.topic, records)
        self.published.extend(done)
        return done

    def received(self) -> int:
        return self.index.received(self.expected)

    async def start_service(self) -> None:
        await asyncio.to_thread(self.service.start, 60)

    async def kill_service(self) -> None:
        await asyncio.to_thread(self.service.kill)

    async def reached(self, count: int, within: float) -> None:
        """Wait until `count` expected mails arrived."""
        await poll(
            lambda: self.received() >= count,
            within,
            lambda: f"{self.received()} of {count} mails arrived; log: {self.service.log_path}",
        )

    async def next_acceptance(self, within: float) -> None:
        """Return once the SMTP server accepts one more message (or after `within` s)."""
        seen = len(self.smtp.messages)
        with contextlib.suppress(AssertionError):
            await poll(lambda: len(self.smtp.messages) > seen, within, str, interval=0.005)

    async def wait_delivered(self, within: float = 0) -> bool:
        """Wait for every expected mail (bounded; early out once the group is caught up)."""
        return await wait_for_mail(
            self.index,
            self.expected,
            within or DELIVERY_WITHIN,
            finished=self.caught_up,
            stall=STALL,
        )

    async def caught_up(self) -> bool:
        try:
            return await group_caught_up(self.bootstrap, self.topic, self.group)
        except Exception:  # broker just restarting, group rebalancing: not known yet
            return False

    async def probe_if(self, delivered: bool) -> tuple[bool, str]:
        """still_consuming(), unless the mail never arrived: then nothing is worth probing."""
        return await self.still_consuming() if delivered else (False, "not delivered")

    async def still_consuming(self) -> tuple[bool, str]:
        """New events after the fault are served, and the group has a stable member."""
        probes = [self.factory.event() for _ in range(PROBES)]
        await self.publish(probes)
        wanted = frozenset().union(*(p.expected for p in probes))
        served = await wait_for_mail(self.index, wanted, 60, settle=0.5, finished=self.caught_up)
        state, members = await group_members(self.bootstrap, self.group)
        ok = served and state == "Stable" and len(members) == 1 and self.service.running
        return ok, f"probes served={served}, group {state} with {len(members)} member(s)"

    async def finish(
        self, *, still_consuming: bool, details: dict[str, Any] | None = None
    ) -> tuple[CaseReport, list[str]]:
        """Count mail, read the dead-letter topic, record the report; (report, DLQ problems)."""
        dlq: list[KafkaRecord] = await read_topic(self.bootstrap, self.dlq)
        self.dead_letters = dlq
        report, problems = case_report(
            self.case,
            self.topic,
            self.published,
            self.expected,
            list(self.smtp.messages),
            dlq,
            still_consuming=still_consuming,
            seconds=time.monotonic() - self.started,
            details=details or {},
        )
        if dlq:
            stages = Counter(d.header("x-error-stage") or "" for d in dlq)
            report.details["dead_letter_stages"] = dict(sorted(stages.items()))
        REPORTS.append(report)
        print(f"\n{report.case}: {report.as_dict()}")
        return report, problems


@pytest.fixture
def smtp() -> Iterator[SmtpRecorder]:
    """The SMTP server of a case: records mail, takes SMTP_DELAY per message, fails on cue."""
    server = SmtpRecorder(delay=SMTP_DELAY)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def fault_run(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic: str,
    smtp: SmtpRecorder,
) -> AsyncIterator[FaultRun]:
    case = request.node.name.removeprefix("test_")
    rng = random.Random(f"{SEED}:{case}")
    ledger = tmp_path / "ledger.sqlite3"
    env = service_env(bootstrap=kafka_bootstrap, topic=topic, smtp_port=smtp.port, ledger=ledger)
    service = ServiceProcess(env, free_port(), log_path=tmp_path / "service.log")
    run = FaultRun(
        case=case,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp=smtp,
        service=service,
        env=env,
        ledger=ledger,
        rng=rng,
        factory=EventFactory(rng),
        index=MailIndex(smtp),
    )
    try:
        yield run
    finally:
        await asyncio.to_thread(service.stop, 15)


# --- 1. SIGKILL ------------------------------------------------------------------------------


async def test_sigkill_at_random_moments(fault_run: FaultRun) -> None:
    """kill -9 several times mid-stream; duplicates only for mails in flight at a kill.

    The SMTP server spends part of its time per message after accepting it, so a kill
    often falls between the server's acceptance and the ledger's record: those mails are
    "in flight" (accepted, not in the ledger, which is read after each kill) and are the
    only ones allowed to arrive twice, with their original Message-ID.
    """
    run = fault_run
    run.smtp.delay, run.smtp.reply_delay = SMTP_DELAY * 0.6, SMTP_DELAY * 0.4
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    gap = max(5, total // 20)  # mail that must flow between a restart and the next kill
    kills = scaled(3, 6)
    span = 0.8 / kills  # one kill at a random moment in each of `kills` slices of the run
    marks = [int(total * (0.05 + span * (k + run.rng.random()))) for k in range(kills)]
    await run.start_service()
    history: list[dict[str, int]] = []
    in_flight_ids: set[str] = set()
    last = 0
    for mark in marks:
        target = max(mark, last + gap)
        if target >= total - gap:
            break
        await run.reached(target, DELIVERY_WITHIN)
        # Kill at a random moment while mail flows: just after the server accepted one.
        await run.next_acceptance(within=5)
        await asyncio.sleep(run.rng.uniform(0, run.smtp.reply_delay))
        await run.kill_service()
        # The SMTP server finishes (accepts) any message whose DATA the client completed.
        await asyncio.sleep(SMTP_DELAY + 0.5)
        accepted = {i for i, n in run.index.update().items() if n}
        in_flight = accepted - await asyncio.to_thread(ledger_sent_ids, run.ledger)
        in_flight_ids |= in_flight
        last = run.received()
        history.append({"at_received": last, "in_flight": len(in_flight)})
        await run.start_service()
    delivered = await run.wait_delivered()
    consuming, how = await run.probe_if(delivered)
    in_flight_total = sum(k["in_flight"] for k in history)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "kills": len(history),
            "in_flight_at_kills": [k["in_flight"] for k in history],
            "killed_at_received": [k["at_received"] for k in history],
            "dup_bound": in_flight_total,
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.service.log_path, dup_bound=in_flight_total)
    assert len(history) >= 2, f"only {len(history)} kills landed mid-stream"
    # Not just as many: the very mails that arrived twice were in flight at a kill.
    twice = {mid for mid, n in run.index.update().items() if n > 1}
    never_in_flight = sorted(twice - in_flight_ids)
    assert not never_in_flight, f"duplicated but never in flight: {never_in_flight[:5]}"


# --- 2. SMTP outage --------------------------------------------------------------------------


async def test_smtp_server_down_and_back(fault_run: FaultRun) -> None:
    """The SMTP server goes away for 10 s (full: 60 s) mid-stream; nothing lost or doubled."""
    run = fault_run
    events = run.factory.events_for(NOTIFICATIONS)
    half = len(events) // 2
    await run.publish(events[:half])
    await run.start_service()
    await run.reached(max(1, len(run.expected) // 4), DELIVERY_WITHIN)
    _, members_before = await group_members(run.bootstrap, run.group)
    outage = scaled(10, 60)
    run.smtp.stop()
    down_at = run.received()
    pending = len(run.expected) - down_at  # of the first half: mid-stream, some still to go
    await run.publish(events[half:])  # arrives during the outage
    await asyncio.sleep(outage)
    run.smtp.start()
    delivered = await run.wait_delivered()
    consuming, how = await run.probe_if(delivered)
    _, members_after = await group_members(run.bootstrap, run.group)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "outage_s": outage,
            "received_when_down": down_at,
            "same_group_member": members_before == members_after,
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.service.log_path)
    assert members_before == members_after, (
        f"the consumer left its group during the outage: {members_before} -> {members_after}"
    )
    assert pending > 0, "the first half was delivered before the outage: not mid-stream"


# --- 3. 4xx bursts ---------------------------------------------------------------------------


async def test_bursts_of_4xx(fault_run: FaultRun) -> None:
    """Bursts of 451 at end of DATA and at RCPT while mail flows: both are answered, and
    every mail still arrives exactly once."""
    run = fault_run
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    stop = asyncio.Event()
    bursts = {"data_451": 0, "rcpt_451": 0}

    async def inject() -> None:
        # Queued refusals: each is answered by the next DATA or RCPT, whichever address
        # it is for, so every burst lands while mail flows. A new burst only once mail got
        # through since the last one: bursts, not a blockade that outpaces the retries.
        first = True
        accepted = 0
        while not stop.is_set():
            await asyncio.sleep(run.rng.uniform(0.3, 1.0))
            if not first and len(run.smtp.messages) < accepted + 5:
                continue
            accepted = len(run.smtp.messages)
            n = run.rng.randint(3, 12)
            run.smtp.fail_next(n, 451)
            bursts["data_451"] += n
            if first or run.rng.random() < 0.3:
                k = run.rng.randint(1, 4)
                run.smtp.fail_next_rcpt(k, 451, "4.2.1 busy")
                bursts["rcpt_451"] += k
            first = False

    injector = asyncio.create_task(inject())
    try:
        await run.start_service()
        await run.reached(int(total * 0.9), DELIVERY_WITHIN)
    finally:
        stop.set()
        await injector
        run.smtp.clear_faults()
    delivered = await run.wait_delivered()
    consuming, how = await run.probe_if(delivered)
    refused = run.smtp.data_attempts - len(run.smtp.messages)
    rcpt_refused = run.smtp.rcpt_refusals
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            **bursts,
            "data_refused_451": refused,
            "rcpt_refused_451": rcpt_refused,
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.service.log_path)
    assert refused > 0, "no 451 was answered at DATA: the case did not inject anything"
    assert rcpt_refused > 0, "no 451 was answered at RCPT: the case did not inject anything"


# --- 4. one recipient always 550 -------------------------------------------------------------


async def test_one_recipient_always_550(fault_run: FaultRun) -> None:
    """Its notifications are dead-lettered (stage smtp); every other recipient is served."""
    run = fault_run
    blocked = "blocked@staff.test"
    run.factory = EventFactory(run.rng, refuse=blocked, refuse_share=0.1)
    run.smtp.fail_rcpt(blocked, 550, "5.1.1 no such mailbox")
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    refused = sum(1 for p in run.published if p.record.refused)
    assert refused > 0, "no event has the refused recipient: nothing to prove"
    await run.start_service()
    delivered = await run.wait_delivered()
    await wait_for_dead_letters(run.bootstrap, run.dlq, refused, 60)
    consuming, how = await run.probe_if(delivered)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={"refused_events": refused, "consuming": how},
    )
    assert_clean(report, problems, run.service.log_path)
    assert not any(blocked in m.rcpt_tos for m in run.smtp.messages)
    assert report.dead_lettered == sum(1 for p in run.published if p.record.refused)


# --- 5. Kafka broker restart -----------------------------------------------------------------


async def test_broker_restart_mid_stream(
    request: pytest.FixtureRequest, fault_run: FaultRun
) -> None:
    """The broker stops (SIGTERM) mid-stream and comes back on the same port."""
    if os.environ.get("NOTIFY_TEST_KAFKA_BOOTSTRAP"):
        pytest.skip("the broker is external: this case needs the session's own broker")
    node = request.getfixturevalue("kafka_node")
    run = fault_run
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    await run.start_service()
    down = scaled(5, 20)
    try:
        await run.reached(max(1, total // 4), DELIVERY_WITHIN)
        down_at = run.received()
        started = time.monotonic()
        await asyncio.to_thread(node.stop)
        stopped_in = time.monotonic() - started
        await asyncio.sleep(down)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(node.start)
        if not node.running:  # one more try: the rest of the session needs the broker
            await asyncio.to_thread(node.start)
    delivered = await run.wait_delivered()
    consuming, how = await run.probe_if(delivered)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "down_s": down,
            "stop_took_s": round(stopped_in, 1),
            "received_when_stopped": down_at,
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.service.log_path)
    assert down_at < total, "every mail had arrived before the broker stopped: not mid-stream"
    assert node.bootstrap == run.bootstrap, "the broker came back on another port"


# --- 6. poison -------------------------------------------------------------------------------


async def test_poison_interleaved(fault_run: FaultRun) -> None:
    """Every kind of poison between good events: each dead-lettered once, the rest served."""
    run = fault_run
    good = run.factory.events_for(NOTIFICATIONS)
    poison = [p for _ in range(scaled(1, 3)) for p in poison_messages(run.factory)]
    await run.publish(interleave(run.rng, good, poison))
    sent = sum(1 for p in run.published if p.record.poison)
    await run.start_service()
    delivered = await run.wait_delivered()
    await wait_for_dead_letters(run.bootstrap, run.dlq, sent, 60)
    consuming, how = await run.probe_if(delivered)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={"poison_kinds": len({p.label for p in poison if p.poison}), "consuming": how},
    )
    assert_clean(report, problems, run.service.log_path)
    assert report.dead_lettered == sent


# --- 7. SIGTERM restarts ---------------------------------------------------------------------


async def test_sigterm_restarts(fault_run: FaultRun) -> None:
    """Graceful stops (SIGTERM) mid-stream, then restarts: nothing lost, nothing doubled."""
    run = fault_run
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    marks = sorted(int(total * run.rng.uniform(0.1, 0.8)) for _ in range(scaled(2, 4)))
    await run.start_service()
    stops: list[dict[str, float]] = []
    for mark in marks:
        await run.reached(mark, DELIVERY_WITHIN)
        at_received = run.received()
        started = time.monotonic()
        code = await asyncio.to_thread(run.service.stop, 30)
        stops.append(
            {
                "exit": code or 0,
                "seconds": round(time.monotonic() - started, 1),
                "at_received": at_received,
            }
        )
        await run.start_service()
    delivered = await run.wait_delivered()
    consuming, how = await run.probe_if(delivered)
    report, problems = await run.finish(
        still_consuming=consuming, details={"stops": stops, "consuming": how}
    )
    assert_clean(report, problems, run.service.log_path)
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete: -15 is graceful;
    # -9 would mean ServiceProcess.stop() had to kill it after 30 s.
    assert all(s["exit"] in (0, -signal.SIGTERM) for s in stops), f"SIGTERM stops: {stops}"
    assert all(s["at_received"] < total for s in stops), f"a stop was not mid-stream: {stops}"
    shutdowns = run.service.log_text().count("Application shutdown complete")
    assert shutdowns >= len(stops), f"{shutdowns} clean shutdowns logged for {len(stops)} stops"


# --- 8. replay of dead letters ---------------------------------------------------------------


def notifier(env: dict[str, str], *args: str, within: float = 60) -> str:
    """Run `notifier ARGS` with the case's settings; its standard output."""
    done = run_notifier(*args, env=env, timeout=within)
    assert done.returncode == 0, f"notifier {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout.strip()


async def test_dlq_replay_after_550(fault_run: FaultRun) -> None:
    """A recipient refused with 550 is fixed; `notifier dlq replay --stage smtp` (twice)
    delivers exactly its mails, and the ledger keeps everything else from going out again."""
    run = fault_run
    blocked = "fixed-later@staff.test"
    run.factory = EventFactory(run.rng, refuse=blocked, refuse_share=0.3)
    run.smtp.fail_rcpt(blocked, 550, "5.1.1 no such mailbox")
    await run.publish(run.factory.events_for(scaled(60, 1000)))
    refused_records = [p for p in run.published if p.record.refused]
    assert refused_records, "no event has the refused recipient: nothing to replay"
    refused_ids = frozenset().union(*(p.record.refused for p in refused_records))
    await run.start_service()
    delivered = await run.wait_delivered()
    await wait_for_dead_letters(run.bootstrap, run.dlq, len(refused_records), 60)
    run.smtp.clear_faults()
    run.factory.refuse = None  # the probes of still_consuming() need no refused recipient
    outputs = [await asyncio.to_thread(notifier, run.env, "dlq", "replay", "--stage", "smtp")]
    run.also_expected |= refused_ids
    replayed = await run.wait_delivered(scaled(30, 120))
    outputs.append(await asyncio.to_thread(notifier, run.env, "dlq", "replay", "--stage", "smtp"))
    # A second replay must send nothing new: wait until the service has committed the
    # records it published (it commits only after their mails went out or were skipped).
    await poll(run.caught_up, 30, lambda: "the second replay was never consumed", interval=0.2)
    consuming, how = await run.probe_if(replayed)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "refused_records": len(refused_records),
            "refused_mails": len(refused_ids),
            "delivered_before_replay": delivered,
            "replay_output": outputs,
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.service.log_path)
    # No cursor: each replay publishes every smtp dead letter again.
    assert outputs == [f"replayed {len(refused_records)} dead letter(s) to {run.topic}"] * 2


# --- 9. an address routing accepts but the message cannot carry --------------------------------


async def test_unwritable_recipient_address(fault_run: FaultRun) -> None:
    """An activityUsers token like "ü@staff.test" passes as an address; whatever becomes of
    it (unresolved, or dead-lettered), the other recipient of that event and the events
    after it, on the same ticket too, are served, and nothing is lost."""
    run = fault_run
    ticket = run.rng.randrange(run.factory.tickets)
    odd = run.factory.event(ticket=ticket, users=["ü@staff.test", "fine@staff.test"])
    assert odd.value is not None
    sendable = frozenset(
        mid
        for mid, rcpt in expected_message_ids(odd.value, dict(odd.headers), unresolved_ok=True)
        if rcpt.isascii()
    )
    odd = Outgoing("unwritable address", odd.key, odd.value, odd.headers, sendable)
    await run.publish(
        [
            *run.factory.events_for(scaled(30, 800)),
            odd,
            *(run.factory.event(ticket=ticket) for _ in range(3)),
            *run.factory.events_for(scaled(20, 200)),
        ]
    )
    await run.start_service()
    delivered = await run.wait_delivered()
    consuming, how = await run.probe_if(delivered)
    report, problems = await run.finish(still_consuming=consuming, details={"consuming": how})
    # The odd record may be dead-lettered (a permanent failure of one recipient: stage
    # address) or not (the token unresolved): only its own dead letter is not an error.
    [placed] = [p for p in run.published if p.record is odd]
    own = f"unexpected dead letter for {run.topic}/{placed.partition}/{placed.offset}"
    problems = [p for p in problems if p != own]
    assert_clean(report, problems, run.service.log_path)
    letters = [d for d in run.dead_letters if origin(d) == (placed.partition, placed.offset)]
    assert len(letters) <= 1, f"the odd record was dead-lettered {len(letters)} times"
    assert all(d.header("x-error-stage") == "address" for d in letters), letters


# --- 10. poison the dead-letter topic cannot take as it is ------------------------------------


async def test_poison_at_the_size_limit(fault_run: FaultRun) -> None:
    """Garbage as large as a producer sends by default: its dead letter (the value plus the
    x-* headers) is over that limit. It must still reach the dead-letter topic (truncated
    or not), and the good events after it, on the same ticket too, must be served."""
    run = fault_run
    ticket = run.rng.randrange(run.factory.tickets)
    key = run.factory.ticket_key(ticket)
    size = largest_value(key)
    big = Outgoing("garbage at the size limit", key, run.rng.randbytes(size), (), stage="decode")
    await run.publish(
        [
            *run.factory.events_for(scaled(40, 800)),
            run.factory.event(ticket=ticket),
            big,
            *(run.factory.event(ticket=ticket) for _ in range(3)),
            *run.factory.events_for(scaled(20, 200)),
        ]
    )
    await run.start_service()
    delivered = await run.wait_delivered()
    consuming, how = await run.probe_if(delivered)
    report, problems = await run.finish(
        still_consuming=consuming, details={"value_bytes": size, "consuming": how}
    )
    # The dead letter of the big record may carry its value truncated (marked so, below);
    # every other check holds for it, and all of them for every other record.
    problems = [p for p in problems if not p.startswith(f"{big.label}: value changed")]
    assert_clean(report, problems, run.service.log_path)
    [placed] = [p for p in run.published if p.record is big]
    [letter] = [d for d in run.dead_letters if origin(d) == (placed.partition, placed.offset)]
    if letter.value != big.value:
        assert big.value is not None
        assert letter.value is not None
        assert big.value.startswith(letter.value), "a changed value that is not a truncation"
        assert letter.header("x-error-truncated") == str(size), letter.headers


# --- 11. the dead-letter topic refuses records for a while ------------------------------------


async def test_dead_letter_topic_refuses_then_recovers(fault_run: FaultRun) -> None:
    """The dead-letter topic refuses every record for a while (max.message.bytes too small,
    as after a bad config change). Poison meanwhile must wait, not vanish (its offset stays
    uncommitted); good events behind it on the same ticket must not skip ahead of it,
    while other tickets' mail keeps flowing; once the topic takes records again, every
    poison is dead-lettered and every good mail delivered exactly once."""
    run = fault_run
    await set_topic_config(run.bootstrap, run.dlq, {"max.message.bytes": "64"})
    good = run.factory.events_for(scaled(100, 1000))
    # Not the 1 MB garbage: its dead letter near the size limit is case 10's subject.
    poison = [p for p in poison_messages(run.factory) if p.poison and len(p.value or b"") < 5000]
    # Good events behind poison on its ticket happen by chance; these make sure of some.
    followers = [run.factory.event(ticket=run.factory.ticket_of(p.key)) for p in poison[:3]]
    await run.publish([*interleave(run.rng, good, poison), *followers])
    behind = behind_poison(run.published)
    expected_then = len(run.expected)
    await run.start_service()
    refusing = scaled(8, 20)
    await asyncio.sleep(refusing)
    received_while_refusing = run.received()
    skipped_ahead = sorted(mid for mid in behind if run.index.counts[mid])
    committed_past_poison = await run.caught_up()
    await set_topic_config(run.bootstrap, run.dlq, {"max.message.bytes": "1048588"})
    delivered = await run.wait_delivered()
    sent = sum(1 for p in run.published if p.record.poison)
    # Not asserted here: finish() checks that every poison was dead-lettered exactly once.
    with contextlib.suppress(AssertionError):
        await wait_for_dead_letters(run.bootstrap, run.dlq, sent, 30)
    consuming, how = await run.probe_if(delivered)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "refusing_s": refusing,
            "received_while_refusing": received_while_refusing,
            "mails_behind_poison": len(behind),
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.service.log_path)
    assert behind, "no good event behind a poison on its ticket: nothing to prove"
    assert skipped_ahead == [], f"mail of events behind a poison came first: {skipped_ahead[:5]}"
    assert not committed_past_poison, "the group committed past poison it could not dead-letter"
    assert 0 < received_while_refusing <= expected_then - len(behind), (
        f"{received_while_refusing} of {expected_then} mails while refusing, "
        f"{len(behind)} of them behind poison"
    )


def behind_poison(published: Sequence[Published]) -> frozenset[str]:
    """Mails of good records that follow a poison record of their ticket (key) in the topic."""
    poison = [p for p in published if p.record.poison]
    return frozenset().union(
        *(
            p.record.expected
            for p in published
            if any(
                q.partition == p.partition and q.record.key == p.record.key and q.offset < p.offset
                for q in poison
            )
        )
    )
