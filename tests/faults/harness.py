"""Fault-suite harness: events with a computable set of mails, poison, counting, reports.

Every good event is built so that the mails it must produce are known in advance: its
recipients are e-mail-address tokens (`u{n}@staff.test`, `s{n}@supplier.test`) and its
customer travels in `data.ticket`, so routing needs no directory, and the expected
`Message-ID`s come from the service's own pure functions (parse → route → message_id).
Received mail is counted by `Message-ID`; duplicates are also found independently of the
`Message-ID` (recipient + per-activity markers in the text body), so a re-send that carried
a new id would show up as a duplicate *without* the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import fcntl
import json
import os
import random
import re
import sqlite3
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from devkit import CHECKOUT
from devkit.config import service_env as shared_service_env
from devkit.events import routing_of
from devkit.smtp import Received, SmtpRecorder
from devkit.topics import KafkaRecord, produce, read_topic
from devkit.waiting import poll
from service.core.events import cloudevent_for
from service.core.message import message_id

FULL = os.environ.get("NOTIFY_FAULTS_FULL", "").strip() not in ("", "0", "false", "no")
"""NOTIFY_FAULTS_FULL=1: the full run (≥ 1,000 notifications per case, long outages)."""

SEED = int(os.environ.get("NOTIFY_FAULTS_SEED") or random.SystemRandom().randrange(10**9))
"""NOTIFY_FAULTS_SEED reproduces a run's events, poison placement and fault moments."""

REPORT_DIR = Path(os.environ.get("NOTIFY_FAULTS_REPORT_DIR") or CHECKOUT / "benchmarks" / "out")

MAIL_FROM = "Helpdesk <helpdesk@helpdesk.test>"
DOMAIN = "helpdesk.test"
CONTENT_TYPE = ("content-type", b"application/cloudevents+json")
GARBAGE_BYTES = 1_000_000  # "1 MB"; under the broker's default message.max.bytes (1 MiB + 12)


def scaled(short: int, full: int) -> int:
    """The short (CI) or the full value, by NOTIFY_FAULTS_FULL."""
    return full if FULL else short


# --- what we publish ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One Kafka record to publish, and what the service must make of it.

    Good events carry `expected` (Message-IDs that must arrive exactly once) and `refused`
    (Message-IDs whose recipient the SMTP server refuses for good: the record must then be
    dead-lettered at stage smtp). Poison carries the `stage` its dead letter must name.
    """

    label: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    expected: frozenset[str] = frozenset()
    refused: frozenset[str] = frozenset()
    stage: str | None = None  # set for poison

    @property
    def poison(self) -> bool:
        return self.stage is not None


@dataclass(frozen=True, slots=True)
class Published:
    """An Outgoing record and where the broker put it."""

    record: Outgoing
    partition: int
    offset: int


def expected_message_ids(
    value: bytes, headers: Mapping[str, bytes], *, unresolved_ok: bool = False
) -> list[tuple[str, str]]:
    """(Message-ID, recipient) of every mail the service must send for this event."""
    result = routing_of(value, headers)
    assert unresolved_ok or not result.unresolved, f"unresolved recipients: {result.unresolved}"
    return [(message_id(n, DOMAIN), n.recipient.email.lower()) for n in result.notifications]


class EventFactory:
    """Good events of mixed kinds over many tickets, each with a known set of mails.

    Per event: customer content (60 %), customer update (35 %), 0-3 staff users, sometimes a
    supplier; at least one mail. `refuse` (an address) is added to a share of the events as
    one more staff user: the SMTP server refuses it, the other recipients must be served.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        run_id: str | None = None,
        tickets: int = 40,
        staff: int = 30,
        suppliers: int = 6,
        refuse: str | None = None,
        refuse_share: float = 0.1,
    ) -> None:
        self.rng = rng
        self.run_id = run_id or f"{rng.getrandbits(32):08x}"
        self.tickets = tickets
        self.staff = staff
        self.suppliers = suppliers
        self.refuse = refuse.lower() if refuse else None
        self.refuse_share = refuse_share
        self.count = 0
        self._last_activity: dict[int, str] = {}

    def ticket_key(self, ticket: int) -> bytes:
        return f"{self.run_id}-t{ticket}".encode()

    def ticket_of(self, key: bytes | None) -> int:
        """The ticket number of a key made by ticket_key()."""
        assert key is not None
        return int(key.decode().rpartition("-t")[2])

    def event(
        self,
        extra_headers: Iterable[tuple[str, bytes]] = (),
        *,
        ticket: int | None = None,
        users: Sequence[str] | None = None,
    ) -> Outgoing:
        """One good event (on `ticket`, if given; to exactly `users` as staff, if given)."""
        rng = self.rng
        self.count += 1
        ticket = rng.randrange(self.tickets) if ticket is None else ticket
        ticket_id = f"{self.run_id}-t{ticket}"
        activity_id = f"{self.run_id}-a{self.count}"
        content = rng.random() < 0.6
        update = rng.random() < 0.35
        staff = [
            f"u{n}@staff.test" for n in rng.sample(range(self.staff), rng.choice((0, 1, 1, 2, 3)))
        ]
        if users is not None:
            staff = list(users)
        suppliers = [
            f"s{n}@supplier.test"
            for n in rng.sample(range(self.suppliers), rng.choice((0, 0, 0, 1)))
        ]
        if not (content or update or staff or suppliers):
            content = True
        if self.refuse and rng.random() < self.refuse_share:
            staff.append(self.refuse)
        activity: dict[str, Any] = {
            "id": activity_id,
            "ticketID": ticket_id,
            "ticketActivityType": rng.choice(["E-mail", "Phone call", "Note"]),
            "activityText": f"Grüße from the fault suite. mark:C:{activity_id}:\nSecond line ✓",
            "sendContentByEmail": "Yes" if content else "No",
            "updateText": f"Status changed. mark:U:{activity_id}:",
            "sendUpdateByEmail": "Yes" if update else "No",
            "commentText": "internal note",
            "activityUsers": staff,
            "activitySuppliers": suppliers,
            "activityDate": "2026-11-27T09:15:00Z",
        }
        if parent := self._last_activity.get(ticket):
            activity["parentActivity"] = parent
        self._last_activity[ticket] = activity_id
        wire_ticket = {
            "id": ticket_id,
            "reference": f"F-{ticket}",
            "subject": f"Fault ticket {ticket}",
            "customer": {
                "name": f"Customer {ticket}",
                "email": f"c{ticket}@customer.test",
                "locale": "de" if ticket % 2 else "en",
            },
        }
        event = cloudevent_for(activity, event_id=str(uuid.UUID(int=rng.getrandbits(128))))
        event["data"]["ticket"] = wire_ticket
        value = json.dumps(event).encode()
        headers = (CONTENT_TYPE, *extra_headers)
        mails = expected_message_ids(value, dict(headers), unresolved_ok=users is not None)
        wanted = int(content) + int(update) + len(staff) + len(suppliers)
        assert users is not None or len(mails) == wanted, f"{activity_id}: {len(mails)} mails"
        refused = frozenset(mid for mid, rcpt in mails if rcpt == self.refuse)
        return Outgoing(
            label="good",
            key=self.ticket_key(ticket),
            value=value,
            headers=headers,
            expected=frozenset(mid for mid, _ in mails) - refused,
            refused=refused,
        )

    def events_for(self, mails: int) -> list[Outgoing]:
        """Events until together they must produce at least `mails` mails."""
        out: list[Outgoing] = []
        total = 0
        while total < mails:
            out.append(self.event())
            total += len(out[-1].expected)
        return out


def poison_messages(factory: EventFactory) -> list[Outgoing]:
    """One of each kind of poison, keyed like the good events around them.

    Also one *good* event with a non-UTF-8 custom header, which must be delivered.
    """
    rng = factory.rng

    def key() -> bytes:
        return factory.ticket_key(rng.randrange(factory.tickets))

    def event(**changes: Any) -> dict[str, Any]:
        base = cloudevent_for(
            {"id": f"{factory.run_id}-p{rng.getrandbits(32)}", "ticketID": "1"},
            event_id=str(uuid.uuid4()),
        )
        base["data"]["activity"].update(sendContentByEmail="Yes", activityText="x")
        base.update(changes)
        return base

    def js(value: Any) -> bytes:
        return json.dumps(value).encode()

    no_ticket = event()
    del no_ticket["data"]["activity"]["ticketID"]
    bad_flag = event()
    bad_flag["data"]["activity"]["sendContentByEmail"] = {"nested": ["preset"]}
    mismatch = event()
    mismatch["data"]["ticket"] = {"id": "2", "customer": {"email": "x@customer.test"}}
    poisons = [
        Outgoing(
            "not JSON", key(), b'{"specversion": "1.0", oops', (CONTENT_TYPE,), stage="decode"
        ),
        Outgoing("not UTF-8", key(), b"\xff\xfe\xfd{}", (), stage="decode"),
        Outgoing("empty value", key(), b"", (CONTENT_TYPE,), stage="decode"),
        Outgoing("tombstone", key(), None, (), stage="decode"),
        Outgoing("1 MB garbage", key(), rng.randbytes(GARBAGE_BYTES), (), stage="decode"),
        Outgoing("JSON, not a CloudEvent", key(), js({"hello": "world"}), (), stage="cloudevent"),
        Outgoing("CloudEvent array", key(), js([event()]), (CONTENT_TYPE,), stage="cloudevent"),
        Outgoing(
            "no specversion",
            key(),
            js({k: v for k, v in event().items() if k != "specversion"}),
            (CONTENT_TYPE,),
            stage="cloudevent",
        ),
        Outgoing("unknown type", key(), js(event(type="ticketActivity.deleted")), (), stage="type"),
        Outgoing("activity without ticketID", key(), js(no_ticket), (), stage="activity"),
        Outgoing("activity with bad flag", key(), js(bad_flag), (CONTENT_TYPE,), stage="activity"),
        Outgoing("ticket mismatch", key(), js(mismatch), (), stage="activity"),
        Outgoing(
            "non-UTF-8 content-type header",
            key(),
            js(event()),
            (("content-type", b"application/cloudevents+json\xff\xfe"),),
            stage="cloudevent",
        ),
        Outgoing(
            "non-UTF-8 ce_ header (binary mode)",
            key(),
            js({"activity": {"id": "1", "ticketID": "1"}}),
            (
                ("ce_specversion", b"1.0"),
                ("ce_id", b"\xc3\x28\xa0\xa1"),
                ("ce_source", b"/x"),
                ("ce_type", b"ticketActivity.created"),
            ),
            stage="cloudevent",
        ),
    ]
    good = factory.event(extra_headers=[("x-trace", b"\xff\x00\xfe binary")])
    good_binary = Outgoing("good, binary header", good.key, good.value, good.headers, good.expected)
    return [*poisons, good_binary]


def interleave(rng: random.Random, good: list[Outgoing], extra: list[Outgoing]) -> list[Outgoing]:
    """`good` in order with `extra` inserted at random places (never first)."""
    out = list(good)
    for item in extra:
        out.insert(rng.randrange(1, len(out) + 1), item)
    return out


async def publish(bootstrap: str, topic: str, records: Sequence[Outgoing]) -> list[Published]:
    """Publish in order (idempotent producer: per-partition order kept); where each landed."""
    landed = await produce(bootstrap, topic, records)
    return [Published(r, *where) for r, where in zip(records, landed, strict=True)]


# --- counting mail -----------------------------------------------------------------------

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.M | re.I)
_MARK = re.compile(r"mark:([CU]):([^:\s]+):")


def header_message_id(data: bytes) -> str:
    end = data.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(data[: end if end >= 0 else len(data)])
    return found.group(1).decode("ascii", "replace") if found else "<missing>"


class MailIndex:
    """Received mail by Message-ID, updated incrementally from an SmtpRecorder."""

    def __init__(self, smtp: SmtpRecorder) -> None:
        self.smtp = smtp
        self.counts: Counter[str] = Counter()
        self._seen = 0

    def update(self) -> Counter[str]:
        messages = self.smtp.messages
        n = len(messages)
        for m in messages[self._seen : n]:
            self.counts[header_message_id(m.data)] += 1
        self._seen = n
        return self.counts

    def received(self, ids: Iterable[str]) -> int:
        counts = self.update()
        return sum(1 for i in ids if counts[i])

    def missing(self, ids: Iterable[str]) -> list[str]:
        counts = self.update()
        return sorted(i for i in ids if not counts[i])


def identity(received: Received) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Which notification a mail is, without looking at its Message-ID.

    (envelope recipient, markers in the text body): staff mail carries both markers of
    its activity, customer content the C marker, customer update the U marker.
    """
    message = email.message_from_bytes(
        received.data, _class=EmailMessage, policy=email.policy.default
    )
    assert isinstance(message, EmailMessage)
    part = message.get_body(preferencelist=("plain",))
    text = part.get_content() if part is not None else ""
    marks = tuple(sorted(set(_MARK.findall(str(text)))))
    return ",".join(sorted(r.lower() for r in received.rcpt_tos)), marks


@dataclass
class MailCount:
    expected_mails: int
    received_unique: int
    lost: int
    duplicated: int
    duplicates_with_same_message_id: int
    unexpected: int
    lost_sample: list[str]
    unexpected_sample: list[str]


def count_mail(messages: Sequence[Received], expected: frozenset[str]) -> MailCount:
    """Compare what the SMTP server accepted with what must have arrived exactly once."""
    by_id: Counter[str] = Counter(header_message_id(m.data) for m in messages)
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = defaultdict(list)
    for m in messages:
        groups[identity(m)].append(header_message_id(m.data))
    duplicated = sum(len(ids) - 1 for ids in groups.values())
    same_id = sum(len(ids) - 1 for ids in groups.values() if len(set(ids)) == 1)
    unexpected = sorted(i for i in by_id if i not in expected)
    lost = sorted(expected - set(by_id))
    return MailCount(
        expected_mails=len(expected),
        received_unique=len(expected & set(by_id)),
        lost=len(lost),
        duplicated=duplicated,
        duplicates_with_same_message_id=same_id,
        unexpected=sum(by_id[i] for i in unexpected),
        lost_sample=lost[:5],
        unexpected_sample=unexpected[:5],
    )


# --- the service -------------------------------------------------------------------------


def postgres_sent_ids(url: str) -> set[str]:
    """Message-IDs a PostgreSQL ledger records as sent (read while the service runs)."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT message_id FROM deliveries WHERE status='sent'").fetchall()
    return {str(r[0]) for r in rows}


def ledger_sent_ids(path: Path) -> set[str]:
    """Message-IDs the service's SQLite ledger records as sent (read while it is down)."""
    if not path.exists():
        return set()
    conn = sqlite3.connect(path, timeout=10)
    try:
        rows = conn.execute("SELECT message_id FROM deliveries WHERE status='sent'")
        return {str(r[0]) for r in rows}
    except sqlite3.OperationalError:  # killed before the schema was written
        return set()
    finally:
        conn.close()


# --- the service -------------------------------------------------------------------------


def service_env(
    *, bootstrap: str, topic: str, smtp_port: int, ledger: Path | str, **overrides: Any
) -> dict[str, str]:
    """NOTIFY_* for a service tuned for this suite: pool 8, batches of 200, no directory.

    `ledger` is a SQLite file, or a ledger URL (the shared PostgreSQL of the scale-out cases).
    """
    url = ledger if isinstance(ledger, str) else f"sqlite:///{ledger}"
    work = Path(tempfile.gettempdir()) if isinstance(ledger, str) else ledger.parent
    values: dict[str, Any] = {
        "ledger_url": url,
        "directory_file": None,
        "reply_to": None,
        "mail_from": MAIL_FROM,
        "message_id_domain": DOMAIN,
        "smtp_pool_size": 8,
        "retry_max_seconds": 1,
        "graceful_timeout_seconds": 5,
        "batch_max_records": 200,
        # Every case mails the same handful of recipients a thousand times: the hourly
        # limit (section 10) would hold most of it back, so it is off, explicitly.
        "recipient_limit_per_hour": 0,
    }
    values.update(overrides)
    return shared_service_env(work, bootstrap=bootstrap, topic=topic, smtp_port=smtp_port, **values)


# --- waiting -----------------------------------------------------------------------------


async def wait_for_mail(
    index: MailIndex,
    expected: frozenset[str],
    within: float,
    settle: float = 2.0,
    *,
    finished: Callable[[], Awaitable[bool]] | None = None,
    quiet: float = 6.0,
    stall: float = 0,
) -> bool:
    """Wait until every expected Message-ID arrived, then up to `settle` s for stragglers.

    The settling ends early once `finished()` says the service is done (its group committed
    everything): it commits a record only after its mails were accepted and recorded, so
    nothing more can come for what was published (and the case counts mail only later).
    Gives up early when no mail arrived for `quiet` s and `finished()` says so too, or when
    none arrived for `stall` s (if set): what is missing then will not come. Returns
    whether all arrived; the report says what is missing.
    """
    deadline = time.monotonic() + within
    last_count, last_change = -1, time.monotonic()
    while True:
        count = index.received(expected)
        if count == len(expected):
            await settled(finished, settle)
            return True
        now = time.monotonic()
        if count != last_count:
            last_count, last_change = count, now
        idle = now - last_change
        stalled = bool(stall) and idle > stall
        if now > deadline or stalled:
            return False
        if finished is not None and idle > quiet and await finished():
            return False
        await asyncio.sleep(0.1)


async def settled(finished: Callable[[], Awaitable[bool]] | None, within: float) -> None:
    """Wait `within` s, or less once `finished()` is true."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if finished is not None and await finished():
            return
        await asyncio.sleep(0.1)


async def wait_for_dead_letters(bootstrap: str, dlq: str, count: int, within: float) -> None:
    """Wait until the dead-letter topic holds at least `count` records."""
    seen: list[int] = [0]

    async def enough() -> bool:
        seen[0] = len(await read_topic(bootstrap, dlq))
        return seen[0] >= count

    await poll(enough, within, lambda: f"{seen[0]} of {count} dead letters in {dlq}", interval=1.0)


# --- reports -----------------------------------------------------------------------------


@dataclass
class CaseReport:
    case: str
    good_events: int
    expected_mails: int
    received_unique: int
    lost: int
    duplicated: int
    duplicates_with_same_message_id: int
    unexpected: int
    dead_lettered: int
    poison_sent: int
    still_consuming: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = (
    ("case", "case"),
    ("good_events", "good events"),
    ("expected_mails", "expected mails"),
    ("received_unique", "received (unique)"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("duplicates_with_same_message_id", "dup. with same Message-ID"),
    ("unexpected", "unexpected"),
    ("dead_lettered", "dead-lettered"),
    ("poison_sent", "poison sent"),
    ("still_consuming", "still consuming"),
    ("seconds", "seconds"),
)


def markdown_table(reports: Sequence[CaseReport]) -> str:
    rows = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join(" --- " for _ in COLUMNS) + "|",
    ]
    for report in reports:
        values = report.as_dict()
        cells = []
        for key, _ in COLUMNS:
            value = values[key]
            if isinstance(value, bool):
                value = "yes" if value else "NO"
            elif isinstance(value, float):
                value = f"{value:.1f}"
            cells.append(str(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def case_report(
    case: str,
    topic: str,
    published: Sequence[Published],
    expected: frozenset[str],
    messages: Sequence[Received],
    dlq: Sequence[KafkaRecord],
    *,
    still_consuming: bool,
    seconds: float,
    details: dict[str, Any],
) -> tuple[CaseReport, list[str]]:
    """The report of a case from what was published, received and dead-lettered; with the
    problems of the dead-letter topic (check_dead_letters)."""
    problems = check_dead_letters(topic, published, dlq)
    mail = count_mail(messages, expected)
    report = CaseReport(
        case=case,
        good_events=sum(1 for p in published if not p.record.poison),
        expected_mails=mail.expected_mails,
        received_unique=mail.received_unique,
        lost=mail.lost,
        duplicated=mail.duplicated,
        duplicates_with_same_message_id=mail.duplicates_with_same_message_id,
        unexpected=mail.unexpected,
        dead_lettered=len(dlq),
        poison_sent=sum(1 for p in published if p.record.poison),
        still_consuming=still_consuming,
        seconds=round(seconds, 1),
        details=dict(details),
    )
    if mail.lost:
        report.details["lost_sample"] = mail.lost_sample
    if mail.unexpected:
        report.details["unexpected_sample"] = mail.unexpected_sample
    if problems:
        report.details["dlq_problems"] = problems[:10]
    return report, problems


def assert_clean(
    report: CaseReport, problems: list[str], log: Path | str, *, dup_bound: int = 0
) -> None:
    """0 lost, nothing unexpected, duplicates within `dup_bound` and with their original
    Message-ID, a clean dead-letter topic, still consuming; `log` names the service log(s)."""
    where = f"(service log: {log})"
    assert report.lost == 0, (
        f"{report.lost} of {report.expected_mails} mails lost, e.g. "
        f"{report.details.get('lost_sample')} {where}"
    )
    assert report.unexpected == 0, (
        f"{report.unexpected} mails with an unexpected Message-ID, e.g. "
        f"{report.details.get('unexpected_sample')} {where}"
    )
    assert report.duplicated <= dup_bound, (
        f"{report.duplicated} duplicates, at most {dup_bound} allowed {where}"
    )
    assert report.duplicates_with_same_message_id == report.duplicated, (
        f"only {report.duplicates_with_same_message_id} of {report.duplicated} duplicates "
        f"carry their original Message-ID {where}"
    )
    assert not problems, f"dead-letter topic: {problems[:10]} {where}"
    assert report.still_consuming, f"the service stopped consuming: {report.details} {where}"


PARTS = ("single instance", "several instances")
"""The report's sections, in order: tests/faults/test_faults.py, then test_scaleout.py."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`: two pytest-xdist workers may write the report at once."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def print_module_report(
    request: pytest.FixtureRequest,
    reports: Sequence[CaseReport],
    started: float,
    part: str,
    title: str,
) -> None:
    """After a fault module: write its part of the report and print its table, uncaptured."""
    if not reports:
        return
    path = write_reports(reports, started, part=part)
    text = f"\n\n{title}, seed {SEED} ({path}):\n{markdown_table(reports)}\n"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(text)


def write_reports(
    reports: Sequence[CaseReport], started: float, part: str = "single instance"
) -> Path:
    """benchmarks/out/faults[-short].{md,json}; returns the Markdown file.

    Each test module writes its own part (section) and keeps the others' that are there,
    so one report holds every case however the modules were spread over workers
    (scripts/faults starts from no report).
    """
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    name = "faults" if FULL else "faults-short"
    meta = {
        "version": "full" if FULL else "short",
        "seed": SEED,
        "total_seconds": round(time.monotonic() - started, 1),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    json_path, path = REPORT_DIR / f"{name}.json", REPORT_DIR / f"{name}.md"
    with _locked(REPORT_DIR / f".{name}.lock"):
        parts: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError, AttributeError):
            parts = dict(json.loads(json_path.read_text()).get("parts") or {})
        parts[part] = {**meta, "cases": [r.as_dict() for r in reports]}
        order = sorted(parts, key=lambda p: (PARTS.index(p) if p in PARTS else len(PARTS), p))
        parts = {p: parts[p] for p in order}
        cases = [case for p in parts.values() for case in p["cases"]]
        json_path.write_text(json.dumps({**meta, "parts": parts, "cases": cases}, indent=2) + "\n")
        sections = [f"# Fault suite ({meta['version']})\n"]
        for title, data in parts.items():
            shown = [CaseReport(**case) for case in data["cases"]]
            notes = "\n".join(
                f"- **{r.case}**: " + ", ".join(f"{k}={v}" for k, v in r.details.items())
                for r in shown
                if r.details
            )
            sections.append(
                f"## {title.capitalize()}: seed {data['seed']}, {data['total_seconds']} s,"
                f" {data['generated']}\n\n{markdown_table(shown)}\n\n{notes}\n"
            )
        path.write_text("\n".join(sections))
    return path


def origin(letter: KafkaRecord) -> tuple[int, int] | None:
    """(partition, offset) of the record a dead letter stands for; None if not stated."""
    try:
        return (
            int(letter.header("x-original-partition") or ""),
            int(letter.header("x-original-offset") or ""),
        )
    except ValueError:
        return None


def check_dead_letters(
    topic: str, published: Sequence[Published], dlq: Sequence[KafkaRecord]
) -> list[str]:
    """What is wrong with the dead-letter topic, given what was published (empty: all good).

    Every poison record and every record with a refused recipient must be there exactly
    once, with its original key, value and headers plus the x-error-*/x-original-* headers;
    nothing else may be.
    """
    wanted = {(p.partition, p.offset): p for p in published if p.record.poison or p.record.refused}
    seen: dict[tuple[int, int], list[KafkaRecord]] = defaultdict(list)
    problems: list[str] = []
    for letter in dlq:
        where = origin(letter)
        if where is None:
            problems.append(
                f"dead letter {letter.partition}/{letter.offset}: no x-original-partition/offset"
            )
            continue
        seen[where].append(letter)
    for (partition, offset), letters in seen.items():
        item = wanted.get((partition, offset))
        if item is None:
            problems.append(f"unexpected dead letter for {topic}/{partition}/{offset}")
            continue
        if len(letters) > 1:
            problems.append(f"{item.record.label}: dead-lettered {len(letters)} times")
        letter = letters[0]
        stage = item.record.stage or "smtp"
        if letter.header("x-error-stage") != stage:
            got = letter.header("x-error-stage")
            problems.append(f"{item.record.label}: x-error-stage {got!r}, want {stage!r}")
        reason = letter.header("x-error-reason") or ""
        if not reason or "\r" in reason or "\n" in reason:
            problems.append(f"{item.record.label}: bad x-error-reason {reason[:80]!r}")
        if item.record.refused and "550" not in reason:
            problems.append(f"{item.record.label}: x-error-reason {reason[:80]!r} lacks the 550")
        if letter.header("x-original-topic") != topic:
            problems.append(
                f"{item.record.label}: x-original-topic {letter.header('x-original-topic')!r}"
            )
        if letter.key != item.record.key:
            problems.append(f"{item.record.label}: key {letter.key!r} != {item.record.key!r}")
        if (letter.value or b"") != (item.record.value or b""):
            problems.append(
                f"{item.record.label}: value changed ({len(letter.value or b'')} bytes)"
            )
        original = [h for h in letter.headers if not h[0].startswith(("x-error-", "x-original-"))]
        if original != list(item.record.headers):
            problems.append(
                f"{item.record.label}: headers {original!r} != {list(item.record.headers)!r}"
            )
    for (partition, offset), item in wanted.items():
        if (partition, offset) not in seen:
            problems.append(f"{item.record.label} ({topic}/{partition}/{offset}) not dead-lettered")
    return problems


def largest_value(key: bytes | None, limit: int = 1024 * 1024) -> int:
    """The largest value (with `key`, no headers) aiokafka's producer sends by default.

    Its check (max_request_size, 1 MiB) is on the estimated size of a one-record batch;
    the broker's default message.max.bytes is 12 bytes more, so this lands too.
    """
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, b"x" * mid, []) <= limit:
            low = mid
        else:
            high = mid - 1
    return low
