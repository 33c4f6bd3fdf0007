"""The ledger on both backends: outcomes, group commit, claims, limits, audit reads, pruning."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest

from service.delivery.ledger import (
    BatchFacts,
    BatchQuery,
    Claim,
    ClaimRequest,
    DeadLetter,
    DeliveryQuery,
    Entry,
    Key,
    Ledger,
    ReminderRow,
    Status,
)
from tests.ledger_support import BACKENDS, backend_url, key, opened, run_sql


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def ledger(url: str) -> Ledger:
    opened_ledger = await opened(url)
    yield opened_ledger  # type: ignore[misc]
    await opened_ledger.close()


def requests(keys: list[Key], **kw: object) -> list[ClaimRequest]:
    return [ClaimRequest(k, ticket_id="1042", event_id="e1", **kw) for k in keys]  # type: ignore[arg-type]


async def test_records_survive_reopening(url: str) -> None:
    first = await opened(url)
    sent = key(1)
    await first.record(Entry(sent, Status.SENT, "<a@x>", ticket_id="1042", event_id="e1"))
    await first.close()
    again = await opened(url)
    assert await again.sent([sent, key(2)]) == {sent}
    await again.close()


async def test_sent_is_never_overwritten_and_a_later_sent_wins(ledger: Ledger) -> None:
    k = key(1, kind="supplier")
    await ledger.record(Entry(k, Status.FAILED, "<f@x>", stage="smtp", reason="550"))
    assert await ledger.sent([k]) == set()
    await ledger.record(Entry(k, Status.SENT, "<f@x>"))
    await ledger.record(Entry(k, Status.FAILED, "<f@x>", reason="late"))
    (row,) = await ledger.deliveries(DeliveryQuery(activity="1"))
    assert (row.status, row.reason) == (Status.SENT, None)


async def test_concurrent_records_share_transactions(ledger: Ledger) -> None:
    commits = ledger._commits  # type: ignore[attr-defined]
    write, calls = commits._write, []

    async def counting(items: list[object]) -> None:
        calls.append(len(items))
        await write(items)

    commits._write = counting
    keys = [key(i, f"u{i}@x.test") for i in range(300)]
    await asyncio.gather(*(ledger.record(Entry(k, Status.SENT, f"<{k[0]}@x>")) for k in keys))
    assert await ledger.sent(keys) == set(keys)
    assert sum(calls) == 300
    assert len(calls) < 30, calls  # coalesced: far fewer transactions than records


async def test_look_ups_and_claims_of_many_keys_at_once(ledger: Ledger) -> None:
    # A batch's worth of keys in each call, on both backends.
    sent = [key(i, f"u{i % 150}@x.test") for i in range(450)]
    await asyncio.gather(*(ledger.record(Entry(k, Status.SENT, f"<{k[0]}@x>")) for k in sent))
    fresh = [key(1000 + i, f"u{i % 150}@x.test") for i in range(50)]
    assert await ledger.sent([*sent, *fresh]) == set(sent)
    got = await ledger.claim(requests([*sent, *fresh]), "A", 30, 100)
    assert got == {**dict.fromkeys(sent, Claim.SENT), **dict.fromkeys(fresh, Claim.WON)}
    # Three sent to each of the first 150 recipients in the hour: a limit of 3 holds them.
    more = [key(2000 + i, f"u{i}@x.test") for i in range(300)]
    got = await ledger.claim(requests(more), "A", 30, 3)
    assert [got[k] for k in more] == [Claim.THROTTLED] * 150 + [Claim.WON] * 150
    pairs = [(k.activity_id, k.recipient) for k in sent]
    mails = await ledger.sent_mails(pairs)
    assert mails == {(k.activity_id, k.recipient): {k.kind: f"<{k[0]}@x>"} for k in sent}
    letters = [("t", i % 4, i) for i in range(450)]
    await asyncio.gather(
        *(ledger.record_dead_letter(DeadLetter(w, "decode", None)) for w in letters[::2])
    )
    assert await ledger.dead_lettered(letters) == set(letters[::2])


async def test_dead_letters_are_remembered_once(ledger: Ledger) -> None:
    assert await ledger.dead_lettered([("t", 0, 7)]) == set()
    reason = "render: " + "x" * 300 + "\nsecond line"
    await ledger.record_dead_letter(DeadLetter(("t", 0, 7), "render", reason, "1042", "e1"))
    await ledger.record_dead_letter(DeadLetter(("t", 0, 7), "decode", "again", "1042", "e2"))
    await ledger.record_dead_letter(DeadLetter(("t", 1, 9), "decode", None, "1042", "e3"))
    assert await ledger.dead_lettered([("t", 0, 7), ("t", 1, 7)]) == {("t", 0, 7)}
    letters = await ledger.dead_letters_of("1042")
    assert [letter.where for letter in letters] == [("t", 1, 9), ("t", 0, 7)]
    first = letters[1]
    assert (first.stage, first.event_id) == ("render", "e1")
    assert first.reason is not None
    assert len(first.reason) == 200
    assert "\n" not in first.reason


async def test_claim_rules(ledger: Ledger) -> None:
    fresh, sent, failed, throttled = key(1), key(2), key(3), key(4)
    await ledger.record(Entry(sent, Status.SENT, "<s@x>"))
    await ledger.record(Entry(failed, Status.FAILED, "<f@x>"))
    await ledger.record(Entry(throttled, Status.THROTTLED, None))
    got = await ledger.claim(requests([fresh, sent, failed, throttled]), "A", 30, 0)
    assert got == {fresh: Claim.WON, sent: Claim.SENT, failed: Claim.WON, throttled: Claim.WON}
    # Another owner is held off while A's lease runs; A itself may claim again.
    assert await ledger.claim(requests([fresh, failed]), "B", 30, 0) == {
        fresh: Claim.HELD,
        failed: Claim.HELD,
    }
    assert await ledger.claim(requests([fresh]), "A", 30, 0) == {fresh: Claim.WON}
    await ledger.record(Entry(fresh, Status.SENT, "<n@x>"))
    assert await ledger.claim(requests([fresh]), "B", 30, 0) == {fresh: Claim.SENT}
    (row,) = await ledger.deliveries(DeliveryQuery(activity="3"))
    assert (row.status, row.ticket_id, row.event_id) == (Status.CLAIMED, "1042", "e1")


async def test_an_expired_lease_lets_another_owner_take_over(ledger: Ledger) -> None:
    k = key(1)
    assert await ledger.claim(requests([k]), "A", 0.4, 0) == {k: Claim.WON}
    assert await ledger.claim(requests([k]), "B", 30, 0) == {k: Claim.HELD}
    await asyncio.sleep(0.6)
    assert await ledger.claim(requests([k]), "B", 30, 0) == {k: Claim.WON}
    assert await ledger.claim(requests([k]), "A", 30, 0) == {k: Claim.HELD}


async def test_two_owners_racing_never_both_win(url: str) -> None:
    a, b = await opened(url), await opened(url)
    keys = [key(i, f"r{i % 7}@x.test") for i in range(120)]
    try:
        for _ in range(3):
            results = await asyncio.gather(
                *(a.claim(requests(keys[i : i + 10]), "A", 30, 0) for i in range(0, 120, 10)),
                *(b.claim(requests(keys[i : i + 10]), "B", 30, 0) for i in range(0, 120, 10)),
            )
            won: dict[Key, int] = {}
            for owner, result in zip("A" * 12 + "B" * 12, results, strict=True):
                for k, outcome in result.items():
                    if outcome is Claim.WON:
                        won[k] = won.get(k, 0) + 1
                        assert owner in "AB"
            assert won == dict.fromkeys(keys, 1)
            keys = [Key(k.activity_id + "x", k.kind, k.recipient) for k in keys]
    finally:
        await a.close()
        await b.close()


async def test_the_recipient_limit_holds_across_instances(url: str) -> None:
    a, b = await opened(url), await opened(url)
    try:
        one = "flooded@customer.test"
        keys = [key(i, one) for i in range(40)]
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).claim(requests(keys[i : i + 4]), f"owner{i % 2}", 30, 5)
                for i in range(0, 40, 4)
            )
        )
        outcomes = [o for result in results for o in result.values()]
        assert outcomes.count(Claim.WON) == 5
        assert outcomes.count(Claim.THROTTLED) == 35
        # Another recipient is not affected.
        other = key(99, "calm@customer.test")
        assert await a.claim(requests([other]), "owner0", 30, 5) == {other: Claim.WON}
    finally:
        await a.close()
        await b.close()


async def test_a_released_throttled_mail_is_not_throttled_again(ledger: Ledger) -> None:
    r = "busy@customer.test"
    first = [key(i, r) for i in range(3)]
    assert set((await ledger.claim(requests(first), "A", 30, 3)).values()) == {Claim.WON}
    late = key(10, r)
    assert await ledger.claim(requests([late]), "A", 30, 3) == {late: Claim.THROTTLED}
    await ledger.record(Entry(late, Status.THROTTLED, None, stage="throttled"))
    # Still over the limit: only a replay's request (bypass_limit) goes through.
    assert await ledger.claim(requests([late]), "A", 30, 3) == {late: Claim.THROTTLED}
    replay = requests([late], bypass_limit=True)
    assert await ledger.claim(replay, "A", 30, 3) == {late: Claim.WON}
    # A bypass does not help a mail that was never throttled.
    never = key(11, r)
    assert await ledger.claim(requests([never], bypass_limit=True), "A", 30, 3) == {
        never: Claim.THROTTLED
    }
    # Released without a send, it goes back to `throttled`, still releasable.
    await ledger.release([late], "A")
    assert await ledger.claim(replay, "A", 30, 3) == {late: Claim.WON}


async def test_release_frees_the_slot_and_restores_the_row(ledger: Ledger) -> None:
    r = "one@customer.test"
    fresh, failed = key(1, r), key(2, r)
    await ledger.record(Entry(failed, Status.FAILED, "<f@x>", reason="550"))
    assert await ledger.claim(requests([fresh, failed]), "A", 30, 2) == {
        fresh: Claim.WON,
        failed: Claim.WON,
    }
    await ledger.release([fresh, failed], "B")  # not B's claims: nothing happens
    assert await ledger.claim(requests([key(3, r)]), "A", 30, 2) == {key(3, r): Claim.THROTTLED}
    await ledger.release([fresh, failed], "A")
    rows = await ledger.deliveries(DeliveryQuery(recipient=r))
    assert [(row.key, row.status, row.reason) for row in rows] == [(failed, Status.FAILED, "550")]
    got = await ledger.claim(requests([key(3, r)]), "B", 30, 2)
    assert got == {key(3, r): Claim.WON}


async def test_audit_reads_filter_and_order(ledger: Ledger) -> None:
    since = time.time() - 1
    await ledger.record(Entry(key(1), Status.SENT, "<1@x>", ticket_id="1042", event_id="e1"))
    await ledger.record(
        Entry(key(2, "tok"), Status.UNRESOLVED, None, ticket_id="1042", reason="unknown token")
    )
    await ledger.record(Entry(key(3), Status.WITHHELD, None, ticket_id="7", reason="pd"))
    newest = await ledger.deliveries(DeliveryQuery(ticket="1042"))
    assert [(d.key.activity_id, d.status) for d in newest] == [
        ("2", Status.UNRESOLVED),
        ("1", Status.SENT),
    ]
    assert newest[1].message_id == "<1@x>"
    assert newest[1].at >= since
    assert [d.key for d in await ledger.deliveries(DeliveryQuery(status=Status.WITHHELD))] == [
        key(3)
    ]
    assert len(await ledger.deliveries(DeliveryQuery(limit=2))) == 2
    assert await ledger.deliveries(DeliveryQuery(since=time.time() + 60)) == []
    await ledger.record_ticket("1042", "T-1042")
    await ledger.record_ticket("1043", "T-1042")
    assert await ledger.tickets_by_reference("T-1042") == ["1042", "1043"]
    assert await ledger.tickets_by_reference("T-9") == []


async def test_first_start_is_stored_once_across_instances(url: str) -> None:
    a, b = await opened(url), await opened(url)
    try:
        got = await asyncio.gather(*(x.first_start("g", t) for x, t in ((a, 100.0), (b, 200.0))))
        assert got[0] == got[1] in (100.0, 200.0)
        assert await a.first_start("g", 300.0) == got[0]
        assert await a.first_start("other", 300.0) == 300.0
    finally:
        await a.close()
        await b.close()


async def test_prune_deletes_old_rows_in_batches(url: str, ledger: Ledger) -> None:
    for i in range(7):
        await ledger.record(Entry(key(i), Status.SENT, f"<{i}@x>"))
        await ledger.record_dead_letter(DeadLetter(("t", 0, i), "decode"))
    for state in ("scheduled", "done", "cancelled"):
        run_sql(
            url,
            "INSERT INTO reminders (activity_id, kind, moment, state, updated_at)"
            " VALUES (?, 'action_reminder', 0, ?, 0)",
            (state, state),
        )
    assert await ledger.prune(time.time() - 3600, batch_size=3) == 2  # only old reminders
    assert await ledger.prune(time.time() + 1, batch_size=3) == 14
    assert await ledger.sent([key(i) for i in range(7)]) == set()
    assert run_sql(url, "SELECT state FROM reminders") == [("scheduled",)]


async def test_sent_mails_name_what_each_recipient_got_of_an_activity(ledger: Ledger) -> None:
    content = key(7, "dana@customer.test", "customer_content")
    update = key(7, "dana@customer.test", "customer_update")
    staff = key(7, "alice@helpdesk.test", "staff")
    failed = key(7, "bob@helpdesk.test", "staff")
    await ledger.record(Entry(content, Status.SENT, "<a.7.cc@x>", ticket_id="1042"))
    await ledger.record(Entry(update, Status.SENT, "<a.7.cu@x>", ticket_id="1042"))
    await ledger.record(Entry(staff, Status.SENT, "<a.7.st@x>", ticket_id="1042"))
    await ledger.record(Entry(failed, Status.FAILED, "<a.7.bob@x>", ticket_id="1042"))
    found = await ledger.sent_mails(
        [("7", "dana@customer.test"), ("7", "alice@helpdesk.test"), ("7", "bob@helpdesk.test")]
    )
    assert found == {
        ("7", "dana@customer.test"): {
            "customer_content": "<a.7.cc@x>",
            "customer_update": "<a.7.cu@x>",
        },
        ("7", "alice@helpdesk.test"): {"staff": "<a.7.st@x>"},
    }
    assert await ledger.sent_mails([]) == {}


def reminder(
    activity: str, moment: float, *, kind: str = "followup_reminder", state: str = "scheduled"
) -> ReminderRow:
    return ReminderRow(activity, kind, "1042", moment, 0, state, moment - 100, '{"event": 1}')


async def test_reminders_are_stored_read_and_moved(ledger: Ledger) -> None:
    now = time.time()
    await ledger.store_reminders([reminder("r1", now + 60), reminder("r2", now + 30)])
    assert await ledger.next_reminder_due() == pytest.approx(now + 30)
    moved = dataclasses.replace(reminder("r2", now + 90), sequence=1)
    await ledger.store_reminders([moved])
    assert await ledger.next_reminder_due() == pytest.approx(now + 60)
    assert sorted(await ledger.reminders_of(["r1", "r2", "r3"]), key=lambda r: r.activity_id) == [
        reminder("r1", now + 60),
        moved,
    ]
    await ledger.store_reminders([dataclasses.replace(moved, state="cancelled", payload=None)])
    await ledger.store_reminders([dataclasses.replace(reminder("r1", now + 60), state="cancelled")])
    assert await ledger.next_reminder_due() is None


async def test_one_look_up_answers_what_a_batch_asks(ledger: Ledger) -> None:
    """Dead letters, reminders, sent mails and the parents' Message-IDs, in one call: the
    same answers as the four calls it replaces."""
    now = time.time()
    sent, unsent = key(1), key(2)
    parent = key(9, "alice@helpdesk.test", "staff")
    await ledger.record(Entry(sent, Status.SENT, "<a.1@x>", ticket_id="1042"))
    await ledger.record(Entry(parent, Status.SENT, "<a.9.st@x>", ticket_id="1042"))
    await ledger.record_dead_letter(DeadLetter(("activities", 0, 5), "validation"))
    await ledger.store_reminders([reminder("r1", now + 60)])
    query = BatchQuery(
        records=[("activities", 0, 5), ("activities", 0, 6)],
        activities=["r1", "r2"],
        keys=[sent, unsent],
        pairs=[("9", "alice@helpdesk.test"), ("9", "bob@helpdesk.test")],
    )
    facts = await ledger.look_up(query)
    assert facts.dead_lettered == {("activities", 0, 5)}
    assert facts.reminders == [reminder("r1", now + 60)]
    assert facts.sent == {sent}
    assert facts.sent_mails == {("9", "alice@helpdesk.test"): {"staff": "<a.9.st@x>"}}
    assert facts == BatchFacts(
        await ledger.dead_lettered(query.records),
        await ledger.reminders_of(query.activities),
        await ledger.sent(query.keys),
        await ledger.sent_mails(query.pairs),
    )
    assert await ledger.look_up(BatchQuery()) == BatchFacts(set(), [], set(), {})


async def test_a_claim_stores_the_batch_s_reminders_in_its_transaction(ledger: Ledger) -> None:
    now = time.time()
    claims = await ledger.claim(requests([key(1)]), "me", 60, 0, [reminder("r1", now + 60)])
    assert claims == {key(1): Claim.WON}
    assert await ledger.reminders_of(["r1"]) == [reminder("r1", now + 60)]
    # With nothing to claim, the reminders are still stored.
    assert await ledger.claim([], "me", 60, 0, [reminder("r2", now + 30)]) == {}
    assert await ledger.next_reminder_due() == pytest.approx(now + 30)


async def test_a_claim_that_fails_stores_no_reminder(ledger: Ledger) -> None:
    """One transaction: a claim that cannot be written leaves no reminder behind either."""
    now = time.time()
    bad = ClaimRequest(Key("1", "customer_content", "x" * 10), ticket_id=object())  # type: ignore[arg-type]
    with pytest.raises((sqlite3.Error, psycopg.Error)):  # the driver's, for a bad value
        await ledger.claim([bad], "me", 60, 0, [reminder("r1", now + 60)])
    assert await ledger.reminders_of(["r1"]) == []


async def test_a_due_reminder_is_taken_once_until_its_lease_ends(url: str) -> None:
    one, two = await opened(url), await opened(url)
    try:
        now = time.time()
        await one.store_reminders(
            [reminder(f"d{i}", now - 1) for i in range(20)] + [reminder("later", now + 3600)]
        )
        first, second = await asyncio.gather(
            one.take_due_reminders("one", 0.5, 50), two.take_due_reminders("two", 0.5, 50)
        )
        taken = [r.activity_id for r in first + second]
        assert sorted(taken) == sorted(f"d{i}" for i in range(20))  # each once, "later" not
        assert await one.take_due_reminders("one", 0.5, 50) == []  # held
        await asyncio.sleep(0.7)
        again = await two.take_due_reminders("two", 30, 50)  # the leases ended
        assert len(again) == 20
        # Finishing marks it sent; one moved meanwhile stays scheduled, at its new moment.
        assert await two.finish_reminder(again[0], "sent")
        moved = dataclasses.replace(again[1], moment=now + 600, sequence=1)
        await one.store_reminders([moved])
        assert not await two.finish_reminder(again[1], "sent")
        rows = {
            r.activity_id: r
            for r in await one.reminders_of([again[0].activity_id, again[1].activity_id])
        }
        assert rows[again[0].activity_id].state == "sent"
        assert rows[again[0].activity_id].payload is None
        assert rows[again[1].activity_id].state == "scheduled"
        assert rows[again[1].activity_id].moment == pytest.approx(now + 600)
    finally:
        await one.close()
        await two.close()
