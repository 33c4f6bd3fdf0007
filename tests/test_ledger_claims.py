"""The claim rules on plain values: leases, the rolling hour, slots a key already holds."""

from __future__ import annotations

from service.delivery.ledger import Claim, ClaimRequest, Key, Status
from service.delivery.ledger.claims import Row, decide

NOW = 1_000_000.0
R = "dana@customer.test"


def k(i: int) -> Key:
    return Key(str(i), "staff", R)


def row(status: Status, at: float, owner: str | None = None, until: float | None = None) -> Row:
    return Row(status, owner, until, at, None, None)


def test_only_the_last_hour_counts() -> None:
    rows = {k(1): row(Status.SENT, NOW - 3601), k(2): row(Status.SENT, NOW - 10)}
    # `recent` is what the database counted in the window: k(2) only.
    outcomes, grants = decide(
        [ClaimRequest(k(3)), ClaimRequest(k(4))],
        rows,
        {R: 1},
        owner="A",
        now=NOW,
        limit_per_hour=2,
    )
    assert outcomes == {k(3): Claim.WON, k(4): Claim.THROTTLED}
    assert [g.request.key for g in grants] == [k(3)]


def test_a_key_holding_a_slot_is_not_throttled_by_itself() -> None:
    mine = row(Status.CLAIMED, NOW - 5, owner="A", until=NOW + 10)
    expired = row(Status.CLAIMED, NOW - 50, owner="B", until=NOW - 1)
    outcomes, grants = decide(
        [ClaimRequest(k(1)), ClaimRequest(k(2))],
        {k(1): mine, k(2): expired},
        {R: 2},
        owner="A",
        now=NOW,
        limit_per_hour=2,
    )
    assert outcomes == {k(1): Claim.WON, k(2): Claim.WON}
    assert len(grants) == 2


def test_a_takeover_keeps_what_the_first_claim_replaced() -> None:
    taken = Row(Status.CLAIMED, "B", NOW - 1, NOW - 30, Status.THROTTLED, NOW - 900)
    outcomes, grants = decide(
        [ClaimRequest(k(1), bypass_limit=True)],
        {k(1): taken},
        {R: 0},
        owner="A",
        now=NOW,
        limit_per_hour=1,
    )
    assert outcomes == {k(1): Claim.WON}
    assert (grants[0].prior_status, grants[0].prior_at) == (Status.THROTTLED, NOW - 900)


def test_a_key_asked_twice_is_decided_once() -> None:
    outcomes, grants = decide(
        [ClaimRequest(k(1)), ClaimRequest(k(1))], {}, {}, owner="A", now=NOW, limit_per_hour=1
    )
    assert outcomes == {k(1): Claim.WON}
    assert len(grants) == 1


def test_a_live_claim_of_another_owner_holds_even_at_the_limit() -> None:
    held = row(Status.CLAIMED, NOW - 5, owner="B", until=NOW + 1)
    outcomes, grants = decide(
        [ClaimRequest(k(1))], {k(1): held}, {R: 9}, owner="A", now=NOW, limit_per_hour=1
    )
    assert outcomes == {k(1): Claim.HELD}
    assert grants == []
