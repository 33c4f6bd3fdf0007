"""The claim rules, pure: given the rows a claim found and the recipients' counts, who wins.

Both backends read the rows and counts inside one transaction that serialises claims per
recipient (BEGIN IMMEDIATE on SQLite, advisory locks on PostgreSQL), call `decide`, and
write the grants it returns in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.delivery.ledger import Claim, ClaimRequest, Key, Status

WINDOW_SECONDS = 3600.0
COUNTED = (Status.SENT, Status.CLAIMED)
"""Statuses that take one of a recipient's hourly slots."""


@dataclass(frozen=True, slots=True)
class Row:
    """What a claim needs of an existing row."""

    status: Status
    owner: str | None
    claimed_until: float | None
    at: float
    prior_status: Status | None
    prior_at: float | None

    def counted(self, since: float) -> bool:
        return self.status in COUNTED and self.at > since


@dataclass(frozen=True, slots=True)
class Grant:
    """A won claim to write: status `claimed`, this owner, until `now + lease`.

    `prior_*` is what the claim replaces (None when it creates the row), kept so that
    `release` can put the row back as it was.
    """

    request: ClaimRequest
    prior_status: Status | None
    prior_at: float | None


def decide(
    requests: Sequence[ClaimRequest],
    rows: Mapping[Key, Row],
    recent: Mapping[str, int],
    *,
    owner: str,
    now: float,
    limit_per_hour: int,
) -> tuple[dict[Key, Claim], list[Grant]]:
    """Outcomes for every requested key, and the claims to write.

    `rows` holds the existing rows of the requested keys; `recent` the number of rows
    per recipient with a counted status and `at` within the last hour (the requested
    keys' own rows included). A key that already holds a slot keeps it, so re-claiming
    it is never throttled.
    """
    since = now - WINDOW_SECONDS
    counts = dict(recent)
    outcomes: dict[Key, Claim] = {}
    grants: list[Grant] = []
    for request in requests:
        key = request.key
        if key in outcomes:
            continue
        row = rows.get(key)
        if row is not None and row.status is Status.SENT:
            outcomes[key] = Claim.SENT
            continue
        if (
            row is not None
            and row.status is Status.CLAIMED
            and row.owner != owner
            and row.claimed_until is not None
            and row.claimed_until > now
        ):
            outcomes[key] = Claim.HELD
            continue
        holds_slot = row is not None and row.counted(since)
        if limit_per_hour > 0 and not holds_slot:
            effective = row.prior_status if row and row.status is Status.CLAIMED else None
            effective = effective or (row.status if row else None)
            released = request.bypass_limit and effective is Status.THROTTLED
            if not released and counts.get(key.recipient, 0) >= limit_per_hour:
                outcomes[key] = Claim.THROTTLED
                continue
        if not holds_slot:
            counts[key.recipient] = counts.get(key.recipient, 0) + 1
        outcomes[key] = Claim.WON
        if row is None:
            grants.append(Grant(request, None, None))
        elif row.status is Status.CLAIMED:
            # Taking over a claim (ours or an expired one): keep what the first claim replaced.
            grants.append(Grant(request, row.prior_status, row.prior_at))
        else:
            grants.append(Grant(request, row.status, row.at))
    return outcomes, grants
