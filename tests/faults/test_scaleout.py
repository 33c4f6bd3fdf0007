"""Fault injection with several instances: three `notifier run` on one group, one PostgreSQL.

Each case runs three instances of the service as child processes on one consumer group
over a topic of 6 partitions, sharing a ledger in a throwaway PostgreSQL (devkit), and
injects one fault: an instance SIGKILLed mid-stream; an instance frozen (SIGSTOP) past its
session timeout and its claims' lease while it had mails in flight, then woken (the
zombie); scaling 1 → 3 → 1 while the backlog drains; PostgreSQL restarted mid-stream;
PostgreSQL unreachable at start-up. Mail is counted at the SMTP server by Message-ID
(tests/faults/harness.py). Every case ends with 0 lost, 0 duplicated (SIGKILL: no more
than the mails in flight at the kill, each with its original Message-ID) and the group
still consuming: events published at the end are mailed. The short version runs in CI;
NOTIFY_FAULTS_FULL=1 (scripts/faults) runs each case over at least 1,000 notifications.
The cases are the "several instances" part of benchmarks/out/faults[-short].{md,json}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.config import TEST_TIMINGS
from devkit.kafka import KafkaNode
from devkit.postgres import PostgresCluster, create_database, drop_database
from devkit.process import ServiceProcess, free_port
from devkit.smtp import SmtpRecorder
from devkit.topics import create_topics, group_caught_up, group_members, read_topic, unique_topic
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
    postgres_sent_ids,
    print_module_report,
    publish,
    scaled,
    service_env,
    wait_for_mail,
)

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(1500 if FULL else 240),
]

INSTANCES = 3
PARTITIONS = 6
NOTIFICATIONS = scaled(300, 1200)  # per case
DELIVERY_WITHIN = scaled(120, 600)  # seconds for a case's mail to arrive after its fault
STALL = scaled(45, 90)  # seconds without any new mail after which waiting is pointless
PROBES = 5  # events published at the end: the group must still consume them
LEASE = float(TEST_TIMINGS["claim_lease_seconds"])
SESSION = TEST_TIMINGS["session_timeout_ms"] / 1000

BOOTSTRAP_ENV = "NOTIFY_TEST_KAFKA_BOOTSTRAP"  # as in tests/conftest.py
POSTGRES_ENV = "NOTIFY_TEST_POSTGRES_URL"

REPORTS: list[CaseReport] = []
SUITE_STARTED = time.monotonic()


@pytest.fixture(scope="module", autouse=True)
def scaleout_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: the "several instances" part of the fault report; print its table."""
    yield
    print_module_report(
        request, REPORTS, SUITE_STARTED, "several instances", "Fault suite, several instances"
    )


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@dataclass
class ScaleRun:
    """One case: a 6-partition topic, an SMTP server, a PostgreSQL ledger, three instances."""

    case: str
    bootstrap: str
    topic: str
    smtp: SmtpRecorder
    ledger_url: str
    instances: list[ServiceProcess]
    rng: random.Random
    factory: EventFactory
    index: MailIndex
    started: float = field(default_factory=time.monotonic)
    published: list[Published] = field(default_factory=list)
    paused: set[int] = field(default_factory=set)

    @property
    def group(self) -> str:
        return f"{self.topic}-notifier"

    @property
    def expected(self) -> frozenset[str]:
        return frozenset().union(*(p.record.expected for p in self.published))

    @property
    def logs(self) -> str:
        return ", ".join(str(s.log_path) for s in self.instances)

    async def publish(self, records: Sequence[Outgoing]) -> list[Published]:
        done = await publish(self.bootstrap, self.topic, records)
        self.published.extend(done)
        return done

    def received(self) -> int:
        return self.index.received(self.expected)

    def running(self) -> list[int]:
        return [i for i, s in enumerate(self.instances) if s.running]

    async def start(self, *which: int, healthy: bool = True) -> None:
        """Start these instances together (all by default); wait for /healthz if `healthy`."""
        chosen = which or tuple(range(len(self.instances)))
        for i in chosen:
            self.instances[i].spawn()
        if healthy:
            await self.healthy(*chosen)

    async def healthy(self, *which: int, within: float = 60) -> None:
        await asyncio.gather(
            *(asyncio.to_thread(self.instances[i].wait_healthy, within) for i in which)
        )

    async def members(self, count: int, within: float = 60) -> None:
        """Wait until the group is Stable with `count` members (every instance assigned)."""
        seen: list[Any] = [None]

        async def settled() -> bool:
            with contextlib.suppress(Exception):
                seen[0] = await group_members(self.bootstrap, self.group)
            state = seen[0]
            return state is not None and state[0] == "Stable" and len(state[1]) == count

        await poll(settled, within, lambda: f"{count} stable members, got {seen[0]}", interval=0.3)

    async def reached(self, count: int, within: float = DELIVERY_WITHIN) -> None:
        await poll(
            lambda: self.received() >= count,
            within,
            lambda: f"{self.received()} of {count} mails arrived; logs: {self.logs}",
        )

    async def next_acceptance(self, within: float) -> None:
        seen = len(self.smtp.messages)
        with contextlib.suppress(AssertionError):
            await poll(lambda: len(self.smtp.messages) > seen, within, str, interval=0.005)

    async def sent_ids(self) -> set[str]:
        return await asyncio.to_thread(postgres_sent_ids, self.ledger_url)

    async def caught_up(self) -> bool:
        try:
            return await group_caught_up(self.bootstrap, self.topic, self.group)
        except Exception:  # rebalancing, or the broker busy: not known yet
            return False

    async def wait_delivered(self) -> bool:
        return await wait_for_mail(
            self.index, self.expected, DELIVERY_WITHIN, finished=self.caught_up, stall=STALL
        )

    async def still_consuming(self, delivered: bool, members: int) -> tuple[bool, str]:
        """Events published now are mailed, and the group settles Stable with `members`
        members, every running instance among them."""
        if not delivered:
            return False, "not delivered"
        probes = [self.factory.event() for _ in range(PROBES)]
        await self.publish(probes)
        wanted = frozenset().union(*(p.expected for p in probes))
        served = await wait_for_mail(self.index, wanted, 60, settle=0.5, finished=self.caught_up)
        stable = True
        try:
            await self.members(members, within=30)
        except AssertionError:
            stable = False
        state, ids = await group_members(self.bootstrap, self.group)
        alive = len(self.running())
        ok = served and stable and alive == members
        return ok, f"probes served={served}, group {state} with {len(ids)} member(s), {alive} alive"

    def sent_by_instance(self) -> list[int]:
        """Mails each instance logged as sent (its log covers its restarts)."""
        return [sent_in(s.log_text()) for s in self.instances]

    async def finish(
        self, *, still_consuming: bool, details: dict[str, Any]
    ) -> tuple[CaseReport, list[str]]:
        dlq = await read_topic(self.bootstrap, f"{self.topic}.dlq")
        report, problems = case_report(
            self.case,
            self.topic,
            self.published,
            self.expected,
            list(self.smtp.messages),
            dlq,
            still_consuming=still_consuming,
            seconds=time.monotonic() - self.started,
            details={**details, "sent_by_instance": self.sent_by_instance()},
        )
        REPORTS.append(report)
        print(f"\n{report.case}: {report.as_dict()}")
        return report, problems


@pytest.fixture
async def scale_topic(request: pytest.FixtureRequest, kafka_bootstrap: str) -> str:
    """A fresh topic of 6 partitions and its dead-letter topic."""
    if not os.environ.get(BOOTSTRAP_ENV):
        node: KafkaNode = request.getfixturevalue("kafka_node")
        if not node.running:  # a failed broker case elsewhere may have left it down
            node.start()
    name = unique_topic(request.node.name)
    await create_topics(kafka_bootstrap, [name, f"{name}.dlq"], partitions=PARTITIONS)
    return name


def controlled_cluster(request: pytest.FixtureRequest) -> PostgresCluster:
    """The session's own PostgreSQL, for the cases that stop it."""
    if os.environ.get(POSTGRES_ENV):
        pytest.skip("the database server is external: this case needs the session's own")
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    if not cluster.running:
        cluster.start()
    return cluster


@pytest.fixture
def ledger_url(request: pytest.FixtureRequest, postgres_server: str) -> Iterator[str]:
    """A fresh database for the case's shared ledger, dropped afterwards."""
    if not os.environ.get(POSTGRES_ENV):
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        if not cluster.running:
            cluster.start()
    name = f"scale_{uuid.uuid4().hex[:12]}"
    yield create_database(postgres_server, name)
    with contextlib.suppress(psycopg.Error):
        drop_database(postgres_server, name)


@pytest.fixture
def smtp() -> Iterator[SmtpRecorder]:
    server = SmtpRecorder()
    server.start()
    yield server
    server.release()
    server.stop()


@pytest.fixture
async def scale_run(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kafka_bootstrap: str,
    scale_topic: str,
    smtp: SmtpRecorder,
    ledger_url: str,
) -> AsyncIterator[ScaleRun]:
    case = request.node.name.removeprefix("test_")
    rng = random.Random(f"{SEED}:{case}")
    env = service_env(
        bootstrap=kafka_bootstrap,
        topic=scale_topic,
        smtp_port=smtp.port,
        ledger=ledger_url,
        # Three instances and their broker share 2 cores here: rendering in each
        # service's own process keeps it at one process per instance.
        render_workers=0,
        smtp_pool_size=4,
    )
    instances = [
        ServiceProcess(env, free_port(), log_path=tmp_path / f"instance-{i}.log")
        for i in range(INSTANCES)
    ]
    run = ScaleRun(
        case=case,
        bootstrap=kafka_bootstrap,
        topic=scale_topic,
        smtp=smtp,
        ledger_url=ledger_url,
        instances=instances,
        rng=rng,
        factory=EventFactory(rng),
        index=MailIndex(smtp),
    )
    try:
        yield run
    finally:
        for i in run.paused:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(instances[i].pid or 0, signal.SIGCONT)
        await asyncio.gather(*(asyncio.to_thread(s.stop, 15) for s in instances))


def sent_in(log: str) -> int:
    """Mails a service log (JSON lines) records as sent."""
    count = 0
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            count += isinstance(record, dict) and record.get("outcome") == "sent"
    return count


def with_env(run: ScaleRun, **settings: Any) -> None:
    """Change settings of every instance before it starts."""
    for service in run.instances:
        service.env.update({f"NOTIFY_{k.upper()}": str(v) for k, v in settings.items()})


# --- 1. SIGKILL of one instance --------------------------------------------------------------


async def test_sigkill_one_instance(scale_run: ScaleRun) -> None:
    """kill -9 of one of three instances mid-stream: the others take its partitions over
    (after its session timeout, and its claims once their lease ends); duplicates only for
    mails in flight at the kill (accepted by the server, not in the ledger)."""
    run = scale_run
    # Part of the time per message after the server accepted it: a kill often falls
    # between the acceptance and the ledger's record, the crash window.
    run.smtp.delay, run.smtp.reply_delay = 0.05, 0.05
    await run.start()
    await run.members(INSTANCES)
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    await run.reached(int(total * 0.3))
    victim = run.rng.randrange(INSTANCES)
    sent_before = run.sent_by_instance()[victim]
    await run.next_acceptance(within=5)
    await asyncio.sleep(run.rng.uniform(0, run.smtp.reply_delay))
    await asyncio.to_thread(run.instances[victim].kill)
    killed_at = run.received()
    # Accepted by the server by now (its delay has passed), and not recorded a second
    # later, when the others have long recorded theirs: the victim's mails in flight.
    # (Its claims hold them for LEASE s, so nobody has sent them again yet.)
    await asyncio.sleep(run.smtp.delay + 1.5)
    accepted = {i for i, n in run.index.update().items() if n}
    await asyncio.sleep(1.0)
    in_flight = accepted - await run.sent_ids()
    delivered = await run.wait_delivered()
    consuming, how = await run.still_consuming(delivered, INSTANCES - 1)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "victim": victim,
            "victim_sent_before_kill": sent_before,
            "killed_at_received": killed_at,
            "in_flight_at_kill": len(in_flight),
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.logs, dup_bound=len(in_flight))
    assert sent_before > 0, "the victim had sent nothing: it owned no partition"
    assert killed_at < total, "every mail had arrived before the kill: not mid-stream"
    twice = {mid for mid, n in run.index.update().items() if n > 1}
    assert twice <= in_flight, f"duplicated but not in flight: {sorted(twice - in_flight)[:5]}"


# --- 2. the zombie ---------------------------------------------------------------------------


def claimed_by(url: str, pid: int) -> set[tuple[str, str, str, str]]:
    """Keys the instance with process id `pid` holds claims on (its owner name has it)."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT activity_id, kind, recipient, moment FROM deliveries"
            " WHERE status = 'claimed' AND owner LIKE %s",
            (f"%:{pid}:%",),
        ).fetchall()
    return {(str(a), str(k), str(r), str(m)) for a, k, r, m in rows}


def sent_among(url: str, keys: set[tuple[str, str, str, str]]) -> int:
    """How many of `keys` the ledger records as sent."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT activity_id, kind, recipient, moment FROM deliveries WHERE status = 'sent'"
        ).fetchall()
    return len(keys & {(str(a), str(k), str(r), str(m)) for a, k, r, m in rows})


def smtp_ports(pid: int, smtp_port: int) -> set[int]:
    """Local ports of the process's connections to the SMTP server."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == smtp_port
    }


async def test_zombie_instance_wakes_after_its_lease(scale_run: ScaleRun) -> None:
    """One instance freezes (SIGSTOP) while it has mails in flight, for longer than its
    session timeout and its claims' lease; the others take its partitions and send its
    mails; then it wakes (SIGCONT). It must not send any of them: 0 duplicates.

    The freeze falls at a moment when none of its mails can be past the end of DATA: the
    SMTP server holds every RCPT unanswered for a moment, and the freeze waits until all
    mail the server accepted is recorded (else the crash window of section 2 would allow
    a duplicate). Its held transactions and the notifications queued behind its busy
    connections are then the mails in flight: on waking, its lease has run out, and the
    fence (the lease checked before the end of DATA, the claim renewed before a send)
    must stop every one.
    """
    run = scale_run
    # Few connections per instance: notifications queue for one, holding their claims.
    with_env(run, smtp_pool_size=2)
    run.smtp.delay = 0.02
    await run.start()
    await run.members(INSTANCES)
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    await run.reached(int(total * 0.25))
    run.smtp.hold()
    try:

        async def recorded() -> bool:
            accepted = {i for i, n in run.index.update().items() if n}
            return accepted <= await run.sent_ids()

        await asyncio.sleep(0.5)
        await poll(recorded, 15, "every accepted mail recorded", interval=0.2)
        # The zombie is the instance with the most mails queued behind its held ones: an
        # instance caught at the tail of its share has only its held mails in flight, and
        # those end in the SMTP timeout, which the freeze outlasts, not in the fence.
        busiest = []
        for i, candidate in enumerate(run.instances):
            assert candidate.pid is not None
            ports = smtp_ports(candidate.pid, run.smtp.port)
            text = await asyncio.to_thread(candidate.metrics_text)
            flying = metric(text, "notifier_in_flight_notifications")
            ours = {port for _, port in run.smtp.held_peers} & ports
            busiest.append((flying - len(ours), i, ours, flying, text))
        _, zombie, held, in_flight, before = max(busiest)
        service = run.instances[zombie]
        assert service.pid is not None
        claimed = await asyncio.to_thread(claimed_by, run.ledger_url, service.pid)
        os.kill(service.pid, signal.SIGSTOP)
        run.paused.add(zombie)
    finally:
        run.smtp.release()
    stopped_at_received = run.received()
    # Past the session timeout (the group moves its partitions) and the lease of its
    # claims (the new owners may take them), and long enough for them to send.
    frozen = SESSION + LEASE + scaled(3, 6)
    await asyncio.sleep(frozen)
    _, members_while_frozen = await group_members(run.bootstrap, run.group)
    taken_over = await asyncio.to_thread(sent_among, run.ledger_url, claimed)
    received_while_frozen = run.received() - stopped_at_received
    os.kill(service.pid, signal.SIGCONT)
    run.paused.discard(zombie)
    offset = len(service.log_text())
    delivered = await run.wait_delivered()
    consuming, how = await run.still_consuming(delivered, INSTANCES)
    text = await asyncio.to_thread(service.metrics_text)
    sends = {  # how the zombie's sends ended from the freeze on
        outcome: int(
            metric(text, "notifier_smtp_send_seconds_count", outcome=outcome)
            - metric(before, "notifier_smtp_send_seconds_count", outcome=outcome)
        )
        for outcome in ("accepted", "withheld", "transient", "permanent", "error")
    }
    fenced = sends["withheld"]
    sent_after_wake = sent_in(service.log_text(offset))
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "zombie": zombie,
            "frozen_s": frozen,
            "in_flight_at_freeze": int(in_flight),
            "rcpt_held_at_freeze": len(held),
            "claims_held_at_freeze": len(claimed),
            "claims_sent_by_others_while_frozen": taken_over,
            "received_while_frozen": received_while_frozen,
            "members_while_frozen": len(members_while_frozen),
            "withheld_by_fence_after_wake": fenced,
            "zombie_sends_from_the_freeze_on": sends,
            "zombie_sent_after_wake": sent_after_wake,
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.logs)
    assert held, "the zombie had no transaction under way when frozen: nothing to fence"
    # Mails queued behind the held ones: what the fence is for (the busiest instance froze).
    assert in_flight > len(held) >= 1, f"in flight {in_flight}, held {len(held)}"
    assert taken_over > 0, "nobody sent what the zombie had claimed: the fence was not tested"
    # Its queued notifications had their lease checked before the end of DATA: dropped.
    assert fenced >= 1, "no send was withheld by the lease check after the wake"
    assert len(members_while_frozen) == INSTANCES - 1, members_while_frozen
    assert stopped_at_received < total, "every mail had arrived before the freeze"


# --- 3. scaling 1 → 3 → 1 --------------------------------------------------------------------


async def test_scale_one_to_three_to_one(scale_run: ScaleRun) -> None:
    """One instance drains a backlog; two more join mid-stream, then leave (SIGTERM) while
    it still drains: every rebalance hands partitions over without losing or doubling."""
    run = scale_run
    # Slow enough (about 12 mails/s for one instance) that the backlog outlasts two
    # start-ups; small batches, so that the newcomers find records left to take.
    with_env(run, smtp_pool_size=2, batch_max_records=20)
    run.smtp.delay = 0.15
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    await run.start(0)
    await run.reached(int(total * 0.1))
    up_at = run.received()
    # About 4 mails/s while the newcomers start and join, however slow their start-up on a
    # loaded machine: the backlog must outlast it (with 12 mails/s it did not, under load).
    run.smtp.delay = 0.5
    await run.start(1, 2)
    await run.members(INSTANCES)
    run.smtp.delay = 0.15
    # Each newcomer takes part before they leave again.
    await poll(
        lambda: all(n > 0 for n in run.sent_by_instance()) or run.received() == total,
        DELIVERY_WITHIN,
        lambda: f"every instance sending: {run.sent_by_instance()}",
        interval=0.3,
    )
    assert all(n > 0 for n in run.sent_by_instance()), (
        f"the backlog was drained before every instance took part: {run.sent_by_instance()}"
    )
    await run.reached(max(run.received() + 1, int(total * 0.6)))
    down_at = run.received()
    codes = await asyncio.gather(*(asyncio.to_thread(run.instances[i].stop, 30) for i in (1, 2)))
    await run.members(1)
    delivered = await run.wait_delivered()
    consuming, how = await run.still_consuming(delivered, 1)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "scaled_up_at_received": up_at,
            "scaled_down_at_received": down_at,
            "sigterm_exit_codes": list(codes),
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.logs)
    assert down_at < total, "every mail had arrived before the scale-down"
    # uvicorn re-raises the SIGTERM it handled: -15 is a graceful stop, -9 a forced one.
    assert all(c in (0, -signal.SIGTERM) for c in codes), codes


# --- 4. PostgreSQL restarted ------------------------------------------------------------------


async def test_postgres_restarted_mid_stream(
    request: pytest.FixtureRequest, scale_run: ScaleRun
) -> None:
    """The shared ledger's server stops (fast shutdown) mid-stream and starts again: the
    instances rewind, /readyz says 503 meanwhile, and nothing is lost or doubled."""
    cluster = controlled_cluster(request)
    run = scale_run
    run.smtp.delay = 0.03
    await run.start()
    await run.members(INSTANCES)
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    total = len(run.expected)
    await run.reached(int(total * 0.3))
    down = scaled(3, 5)
    try:
        await asyncio.to_thread(cluster.stop)
        down_at = run.received()
        await asyncio.sleep(down)
        ready = await asyncio.to_thread(run.instances[0].get, "/readyz")
    finally:
        await asyncio.to_thread(cluster.start)
    delivered = await run.wait_delivered()
    consuming, how = await run.still_consuming(delivered, INSTANCES)
    texts = await asyncio.gather(*(asyncio.to_thread(s.metrics_text) for s in run.instances))
    rewinds = sum(metric(text, "notifier_batch_rewinds_total") for text in texts)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "down_s": down,
            "received_when_stopped": down_at,
            "readyz_while_down": f"{ready.status_code} {ready.text.strip()}",
            "batch_rewinds": int(rewinds),
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.logs)
    assert down_at < total, "every mail had arrived before the database stopped"
    assert ready.status_code == 503, ready.text
    assert "ledger unreachable" in ready.text, ready.text


# --- 5. PostgreSQL unreachable at start-up ---------------------------------------------------

UNREACHABLE = "ledger unreachable at start-up"


async def test_postgres_unreachable_at_startup(
    request: pytest.FixtureRequest, scale_run: ScaleRun
) -> None:
    """The instances start while the database is down: they wait for it (logged, retried),
    then upgrade its empty schema together (once) and drain the backlog."""
    cluster = controlled_cluster(request)
    run = scale_run
    await run.publish(run.factory.events_for(NOTIFICATIONS))
    down = scaled(3, 10)
    try:
        await asyncio.to_thread(cluster.stop)
        await run.start(healthy=False)
        # Each has started and found the database unreachable (Python start-up of three
        # takes a while here), then stays down a while longer.
        await poll(
            lambda: all(UNREACHABLE in s.log_text() or not s.running for s in run.instances),
            60,
            "every instance trying the ledger",
            interval=0.3,
        )
        await asyncio.sleep(down)
        waiting = [s.running and UNREACHABLE in s.log_text() for s in run.instances]
        mailed_while_down = len(run.smtp.messages)
    finally:
        await asyncio.to_thread(cluster.start)
    await run.healthy(*range(INSTANCES))
    await run.members(INSTANCES)
    delivered = await run.wait_delivered()
    consuming, how = await run.still_consuming(delivered, INSTANCES)
    upgrades = sum(s.log_text().count("upgrading the ledger schema") for s in run.instances)
    report, problems = await run.finish(
        still_consuming=consuming,
        details={
            "down_s": down,
            "waiting_for_the_ledger": waiting,
            "mailed_while_down": mailed_while_down,
            "schema_upgrades": upgrades,
            "consuming": how,
        },
    )
    assert_clean(report, problems, run.logs)
    assert all(waiting), f"not every instance waited for the ledger: {waiting}"
    assert mailed_while_down == 0
    assert upgrades == 1, f"the empty schema was upgraded {upgrades} times"
