"""Reminders on the delivery path: planned from events into the ledger, .ics on staff mail,
sent once when due, to staff and the author only."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
from pathlib import Path
from typing import Any

import icalendar
import pytest

from service.delivery.ledger import DeliveryQuery, LedgerUnavailable, Status
from tests.test_dispatch import CUSTOMER, Rig, activity, event_bytes, record

STAFF = "bob@helpdesk.test"


def dated(when: dt.datetime, **fields: Any) -> dict[str, Any]:
    """An activity by alice for staff bob, with a follow-up at `when` (UTC)."""
    return activity(
        activityUser="alice@helpdesk.test",
        activityUsers=STAFF,
        followupDate=when.date().isoformat(),
        followupTime=when.time().replace(microsecond=0).isoformat(),
        **fields,
    )


def later(hours: float) -> dt.datetime:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours)).replace(microsecond=0)


async def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    await r.open()
    return r


def calendar_of(message: bytes) -> icalendar.Calendar:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    [part] = [p for p in parsed.walk() if p.get_content_type() == "text/calendar"]
    return icalendar.Calendar.from_ical(part.get_payload(decode=True))


async def test_an_event_schedules_its_reminder_and_staff_mail_carries_the_ics(
    tmp_path: Path,
) -> None:
    r = await rig(tmp_path)
    try:
        when = later(5)
        await r.dispatcher.handle_batch([record(event_bytes(dated(when)))])
        [row] = await r.ledger.reminders_of(["5001"])
        assert (row.kind, row.state, row.sequence) == ("followup_reminder", "scheduled", 0)
        assert row.moment == when.timestamp()
        assert row.payload is not None  # the event, to render the reminder from
        [staff] = [m for to, m in r.mailer.accepted if to == STAFF]
        [entry] = calendar_of(staff).walk("VEVENT")
        assert entry.decoded("DTSTART") == when
        assert str(entry["UID"]) == "followup.5001@helpdesk.test"
        assert int(entry["SEQUENCE"]) == 0
        [customer] = [m for to, m in r.mailer.accepted if to == CUSTOMER]
        assert b"text/calendar" not in customer
    finally:
        await r.close()


async def test_updates_move_and_cancel_it(tmp_path: Path) -> None:
    r = await rig(tmp_path)
    try:
        first = later(5)
        await r.dispatcher.handle_batch([record(event_bytes(dated(first)))])
        moved = later(30)
        update = event_bytes(dated(moved), type_="ticketActivity.updated")
        await r.dispatcher.handle_batch(
            [
                record(
                    update.replace(
                        b'"time": "2026-11-27T09:15:00Z"', b'"time": "2026-11-27T10:00:00Z"'
                    )
                )
            ]
        )
        [row] = await r.ledger.reminders_of(["5001"])
        assert (row.state, row.sequence, row.moment) == ("scheduled", 1, moved.timestamp())
        cleared = activity(activityUser="alice@helpdesk.test", activityUsers=STAFF)
        cancel = event_bytes(cleared, type_="ticketActivity.updated")
        await r.dispatcher.handle_batch(
            [
                record(
                    cancel.replace(
                        b'"time": "2026-11-27T09:15:00Z"', b'"time": "2026-11-27T11:00:00Z"'
                    )
                )
            ]
        )
        [row] = await r.ledger.reminders_of(["5001"])
        assert row.state == "cancelled"
        assert row.payload is None
        assert await r.ledger.next_reminder_due() is None
    finally:
        await r.close()


async def test_an_old_backlog_expires_its_reminders_and_mails_nobody_about_them(
    tmp_path: Path,
) -> None:
    r = await rig(tmp_path)
    try:
        await r.dispatcher.handle_batch([record(event_bytes(dated(later(-72))))])
        [row] = await r.ledger.reminders_of(["5001"])
        assert row.state == "expired"
        rows = await r.ledger.deliveries(DeliveryQuery(activity="5001", status=Status.EXPIRED))
        assert {(d.key.kind, d.key.recipient) for d in rows} == {
            ("followup_reminder", "alice@helpdesk.test"),
            ("followup_reminder", STAFF),
        }
        assert r.count("notifier_reminders_total", action="expired") == 1
    finally:
        await r.close()


async def test_a_due_reminder_goes_to_the_author_and_staff_once(tmp_path: Path) -> None:
    r = await rig(tmp_path)
    try:
        soon = later(1 / 3600)  # a second from now
        await r.dispatcher.handle_batch([record(event_bytes(dated(soon)))])
        before = len(r.mailer.accepted)
        await asyncio.sleep(1.2)
        for _ in range(2):  # a second round finds nothing more to send
            rows = await r.ledger.take_due_reminders("me", 60.0, 10)
            await r.dispatcher.send_reminders(rows)
        reminders = r.mailer.accepted[before:]
        assert sorted(to for to, _ in reminders) == ["alice@helpdesk.test", STAFF]
        for _, message in reminders:
            assert b"followup_reminder" in message  # the Message-ID names the kind
        [row] = await r.ledger.reminders_of(["5001"])
        assert row.state == "sent"
        assert r.count("notifier_reminders_total", action="sent") == 1
    finally:
        await r.close()


async def test_a_batch_asks_the_ledger_once_and_stores_its_reminders_with_its_claim(
    tmp_path: Path,
) -> None:
    """Before its first send, a batch makes two trips to the ledger: one look-up (dead
    letters, reminders, sent mails, parents) and one claim transaction that also stores
    the reminders it planned. A claim that fails stores none, and nothing is sent."""
    r = await rig(tmp_path)
    calls: list[str] = []
    ledger: Any = r.ledger
    for name in ("look_up", "claim", "dead_lettered", "reminders_of", "store_reminders", "sent"):
        original = getattr(ledger, name)

        async def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return await _original(*args)

        setattr(ledger, name, counted)
    try:
        await r.dispatcher.handle_batch([record(event_bytes(dated(later(5), id="5001")))])
        assert calls == ["look_up", "claim"]
        assert len(await r.ledger.reminders_of(["5001"])) == 1
        claim = ledger.claim

        async def refused(*args: Any) -> Any:
            raise LedgerUnavailable("sqlite: disk I/O error")

        ledger.claim = refused
        sent = len(r.mailer.accepted)
        with pytest.raises(LedgerUnavailable):
            await r.dispatcher.handle_batch([record(event_bytes(dated(later(6), id="5002")))])
        assert await r.ledger.reminders_of(["5002"]) == []
        assert len(r.mailer.accepted) == sent
        ledger.claim = claim
    finally:
        await r.close()
