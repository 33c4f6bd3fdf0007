"""CPU budget per notification, stage by stage, measured in one process without Kafka.

A wall-clock profile of the service on a busy 2-core machine also counts the time the
process waited for a CPU; this measures `time.process_time()` per stage over the real
workload instead, so the numbers add up to (most of) the service's CPU ms per mail.

    python -m benchmarks.breakdown [--events 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.events import build_workload
from devkit.events import encode, stamped
from service.core.directory import load_directory
from service.core.events import ActivityEvent, parse_event
from service.core.message import build_message, message_id
from service.core.render import Renderer
from service.core.routing import Notification, RoutingPolicy, route
from service.delivery.attachments import DirectoryAttachmentStore
from service.delivery.ledger import Entry, Key, Status
from service.delivery.ledger.sqlite import SqliteLedger
from service.runtime.logs import JsonFormatter
from service.runtime.metrics import Metrics
from service.runtime.settings import default_templates_dir

HEADERS = {"content-type": b"application/cloudevents+json"}


def _cpu(fn: Callable[[], Any], repeat: int = 1) -> float:
    started = time.process_time()
    for _ in range(repeat):
        fn()
    return time.process_time() - started


def breakdown(events: int = 2000) -> dict[str, Any]:
    """µs of CPU per notification for each stage of the service's pipeline."""
    with tempfile.TemporaryDirectory(prefix="notifier-breakdown-") as tmp:
        work = Path(tmp)
        workload = build_workload(work, events, run="bd")
        raw = [encode(stamped(e)) for e in workload.events]
        directory = load_directory(workload.directory_file)
        policy = RoutingPolicy()
        parsed: list[ActivityEvent] = []
        notes: list[Notification] = []
        cost: dict[str, float] = {}
        cost["parse_event (pydantic)"] = _cpu(
            lambda: parsed.extend(parse_event(v, HEADERS) for v in raw)
        )
        cost["route"] = _cpu(
            lambda: notes.extend(
                n for e in parsed for n in route(e, directory, policy).notifications
            )
        )
        count = len(notes)
        renderer = Renderer(default_templates_dir())
        mails = [renderer.render(n) for n in notes[:50]]  # warm-up
        mails = []
        cost["render: Jinja + css-inline"] = _cpu(lambda: mails.extend(map(renderer.render, notes)))
        store = DirectoryAttachmentStore(workload.attachments_dir, 10 << 20, 25 << 20)
        files: list[Any] = []
        cost["attachments: load"] = _cpu(
            lambda: files.extend(store.load(n.attachments) for n in notes)
        )
        now = datetime.now(UTC)

        def build() -> None:
            for n, mail, attached in zip(notes, mails, files, strict=True):
                build_message(
                    n,
                    mail,
                    sender="Helpdesk <helpdesk@helpdesk.test>",
                    reply_to="support@helpdesk.test",
                    domain="helpdesk.test",
                    attachments=attached,
                    date=now,
                )

        cost["build_message (MIME)"] = _cpu(build)
        cost["message_id"] = _cpu(lambda: [message_id(n, "helpdesk.test") for n in notes])
        cost["IPC to render workers (pickle both ways)"] = _ipc_cost(notes, mails, files, now)
        cost["log line per mail (JSON)"] = _log_cost(notes)
        cost["metrics per mail"] = _metrics_cost(count)
        cost["ledger: dead_lettered + sent + record"] = asyncio.run(
            _ledger_cost(work / "ledger.sqlite3", notes, len(parsed))
        )
        per_mail = {k: round(1e6 * v / count, 1) for k, v in cost.items()}
        per_ics = _calendar_cost(notes, now)
        dispatcher_cpu = asyncio.run(_dispatcher_cpu(workload, raw, work / "ledger2.sqlite3"))
        return {
            "events": len(parsed),
            "notifications": count,
            "cpu_us_per_notification": per_mail,
            "total_us": round(sum(per_mail.values()), 1),
            "calendar_us_per_ics": per_ics,
            "dispatcher_us_per_notification": round(1e6 * dispatcher_cpu / count, 1),
            "note": "stages: each measured alone; dispatcher: Dispatcher.handle_batch on "
            "batches of 500 with a mailer that accepts at once (no network) and the SQLite "
            "ledger, i.e. the service minus Kafka, FastStream and aiosmtplib (for the "
            "latter see the ceiling's CPU ms per mail)",
        }


def _ipc_cost(
    notes: list[Notification], mails: list[Any], files: list[Any], now: datetime
) -> float:
    """What a chunk of 64 costs to cross to a worker and back: the notifications pickled
    and unpickled one way, the built messages the other (both ends' CPU)."""
    import pickle

    from service.delivery.build import Built

    built = [
        Built(
            build_message(
                n,
                mail,
                sender="Helpdesk <helpdesk@helpdesk.test>",
                reply_to="support@helpdesk.test",
                domain="helpdesk.test",
                attachments=attached,
                date=now,
            ),
            0.001,
        )
        for n, mail, attached in zip(notes, mails, files, strict=True)
    ]

    def cross() -> None:
        for start in range(0, len(notes), 64):
            pickle.loads(pickle.dumps(notes[start : start + 64], pickle.HIGHEST_PROTOCOL))
            pickle.loads(pickle.dumps(built[start : start + 64], pickle.HIGHEST_PROTOCOL))

    return _cpu(cross)


def _calendar_cost(notes: list[Notification], now: datetime) -> float:
    """µs of CPU per `.ics` (staff mail with one reminder date, NOTIFY_TIMEZONE UTC)."""
    from dataclasses import replace
    from datetime import timedelta

    from service.core.calendar import calendar_attachment
    from service.core.routing import CalendarEntry, Kind

    staff = [
        replace(n, calendar=(CalendarEntry(Kind.FOLLOWUP_REMINDER, now + timedelta(days=3)),))
        for n in notes
        if n.kind is Kind.STAFF
    ][:1000]
    cpu = _cpu(
        lambda: [calendar_attachment(n, zone=UTC, domain="x.test", stamp=now) for n in staff]
    )
    return round(1e6 * cpu / max(1, len(staff)), 1)


def _log_cost(notes: list[Notification]) -> float:
    logger = logging.getLogger("breakdown.dispatch")
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)

    def log() -> None:
        for n in notes:
            logger.info(
                "sent",
                extra={
                    "event_id": "ev-1",
                    "activity_id": n.activity_id,
                    "ticket_id": n.ticket_id,
                    "kind": n.kind.value,
                    "message_id": "<a.1.staff.0123456789abcdef@helpdesk.test>",
                },
            )

    return _cpu(log)


def _metrics_cost(count: int) -> float:
    from prometheus_client import CollectorRegistry

    metrics = Metrics(CollectorRegistry())
    when = datetime.now(UTC)

    def per_mail() -> None:
        for _ in range(count):
            metrics.rendered(0.001)
            with metrics.in_flight():
                metrics.send_finished(0.001, "accepted")
            metrics.notification("staff", "sent")
            metrics.delivered(when)
            metrics.event("ticketActivity.created", "processed")

    return _cpu(per_mail)


async def _ledger_cost(path: Path, notes: list[Notification], events: int) -> float:
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        started = time.process_time()
        per_event = max(1, len(notes) // max(1, events))
        sem = asyncio.Semaphore(64)

        async def record(n: Notification) -> None:
            async with sem:
                await ledger.record(Entry(Key(*n.key), Status.SENT, "<x@y>"))

        # As the dispatcher does: two look-ups per batch of 500 records, a write per mail.
        batch = 500 * per_event
        for first in range(0, len(notes), batch):
            chunk = notes[first : first + batch]
            await ledger.dead_lettered(
                [("t", 0, i) for i in range(first, first + batch, per_event)]
            )
            await ledger.sent([Key(*n.key) for n in chunk])
            await asyncio.gather(*(record(n) for n in chunk))
        return time.process_time() - started  # both threads: process_time counts them all
    finally:
        await ledger.close()


class _NullMailer:
    async def send(
        self,
        sender: str,
        recipient: str,
        message: bytes,
        may_finish: Any = None,
        ready: Any = None,
    ) -> None:
        if ready is not None:
            await ready()


class _NullDeadLetters:
    async def send(self, record: Any, failure: Any) -> None:
        return None


async def _dispatcher_cpu(workload: Any, raw: list[bytes], ledger_path: Path) -> float:
    """CPU seconds (all threads) of Dispatcher.handle_batch over the workload, no network."""
    from prometheus_client import CollectorRegistry

    from service.delivery.build import InlineBuilder, MailSpec
    from service.delivery.config import DeliveryConfig
    from service.delivery.dead_letters import Record
    from service.delivery.dispatch import Dispatcher

    logging.getLogger("service").setLevel(logging.INFO)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    ledger = SqliteLedger(ledger_path)
    await ledger.open()
    dispatcher = Dispatcher(
        config=DeliveryConfig(envelope_from="helpdesk@helpdesk.test", domain="helpdesk.test"),
        directory=load_directory(workload.directory_file),
        builder=InlineBuilder(
            MailSpec(
                templates_dir=default_templates_dir(),
                attachments_dir=workload.attachments_dir,
                max_attachment_bytes=10 << 20,
                max_mail_bytes=25 << 20,
                sender="Helpdesk <helpdesk@helpdesk.test>",
                reply_to="support@helpdesk.test",
                domain="helpdesk.test",
            ).factory()
        ),
        ledger=ledger,
        mailer=_NullMailer(),
        dead_letters=_NullDeadLetters(),
        metrics=Metrics(CollectorRegistry()),
    )
    records = [
        Record(
            "t",
            i % 4,
            i,
            str(e).encode(),
            value,
            (("content-type", b"application/cloudevents+json"),),
            int(time.time() * 1000),
        )
        for i, (e, value) in enumerate(zip(range(len(raw)), raw, strict=True))
    ]
    try:
        started = time.process_time()
        for start in range(0, len(records), 500):
            await dispatcher.handle_batch(records[start : start + 500])
        return time.process_time() - started
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    result = breakdown(args.events)
    print(f"{result['events']} events → {result['notifications']} notifications")
    for stage, us in result["cpu_us_per_notification"].items():
        print(f"  {stage:<40} {us:8.1f} µs")
    print(f"  {'sum of the stages':<40} {result['total_us']:8.1f} µs")
    label = "calendar (.ics), per staff mail with one"
    print(f"  {label:<40} {result['calendar_us_per_ics']:8.1f} µs")
    label = "Dispatcher.handle_batch, no network"
    print(f"  {label:<40} {result['dispatcher_us_per_notification']:8.1f} µs")
    print(f"  ({result['note']})")


if __name__ == "__main__":
    main()
