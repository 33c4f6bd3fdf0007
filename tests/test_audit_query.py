"""The audit's pure parts: parameter checks, row shapes, and the token compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

import service.runtime.audit.auth
from service.delivery.ledger import DeadLetter, Delivery, Key, Status
from service.runtime.audit.auth import Token
from service.runtime.audit.paths import ENDPOINTS, PATHS, endpoint_of
from service.runtime.audit.query import (
    BadParameter,
    check_names,
    from_validation,
    parse_since,
    recipient_filter,
)
from service.runtime.audit.report import dead_letter_json, delivery_json, iso_utc, reason_of

KNOWN = ("ticket", "limit")


def test_check_names_refuses_an_unknown_parameter_by_name() -> None:
    with pytest.raises(BadParameter) as caught:
        check_names([("ticket", "1"), ("tickets", "2")], KNOWN)
    assert caught.value.parameter == "tickets"
    assert "unknown" in caught.value.problem


def test_check_names_refuses_a_parameter_given_twice() -> None:
    with pytest.raises(BadParameter) as caught:
        check_names([("ticket", "1"), ("ticket", "2")], KNOWN)
    assert caught.value.parameter == "ticket"


def test_check_names_takes_known_ones() -> None:
    check_names([("ticket", "1"), ("limit", "5")], KNOWN)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T09:15:00Z", datetime(2026, 11, 27, 9, 15, tzinfo=UTC)),
        ("2026-11-27T10:15:00+01:00", datetime(2026, 11, 27, 9, 15, tzinfo=UTC)),
        ("2026-11-27T09:15:00", datetime(2026, 11, 27, 9, 15, tzinfo=UTC)),  # no zone: UTC
        ("2026-11-27", datetime(2026, 11, 27, tzinfo=UTC)),
        ("2026-11-27T09:15:00.250Z", datetime(2026, 11, 27, 9, 15, 0, 250000, tzinfo=UTC)),
    ],
)
def test_since_takes_iso_8601(text: str, expected: datetime) -> None:
    assert parse_since(text) == expected.timestamp()


@pytest.mark.parametrize("text", ["yesterday", "", "1700000000", "27.11.2026", "2026-13-01"])
def test_since_refuses_anything_else_naming_since(text: str) -> None:
    with pytest.raises(BadParameter) as caught:
        parse_since(text)
    assert caught.value.parameter == "since"
    assert "ISO 8601" in caught.value.problem


def test_since_absent_is_no_filter() -> None:
    assert parse_since(None) is None


def test_recipient_addresses_match_in_any_case_tokens_as_they_are() -> None:
    assert recipient_filter("Dana@Customer.TEST") == "dana@customer.test"
    assert recipient_filter("No-Such-Department") == "No-Such-Department"
    assert recipient_filter(None) is None


def test_validation_errors_become_a_named_parameter() -> None:
    error = {"loc": ("query", "limit"), "type": "less_than_equal", "msg": "too big"}
    bad = from_validation([error])
    assert (bad.parameter, bad.problem) == ("limit", "must be from 1 to 1000")
    other = from_validation([{"loc": ("query", "x"), "type": "strange", "msg": "odd"}])
    assert (other.parameter, other.problem) == ("x", "odd")


def test_rows_have_exactly_the_contract_fields() -> None:
    d = Delivery(
        key=Key("5001", "customer_content", "dana@customer.test"),
        status=Status.SENT,
        ticket_id="1042",
        event_id="e-1",
        message_id="<a.5001@helpdesk.test>",
        stage=None,
        reason=None,
        created_at=0.0,
        at=datetime(2026, 11, 27, 9, 15, 2, 600000, tzinfo=UTC).timestamp(),
    )
    assert delivery_json(d) == {
        "ticket": "1042",
        "activity": "5001",
        "kind": "customer_content",
        "recipient": "dana@customer.test",
        "status": "sent",
        "at": "2026-11-27T09:15:02Z",
        "message_id": "<a.5001@helpdesk.test>",
        "reason": None,
    }


def test_a_failure_reason_is_led_by_its_stage_once() -> None:
    assert reason_of("smtp", "550 5.1.1 unknown") == "smtp: 550 5.1.1 unknown"
    assert reason_of("smtp", "smtp: 550 5.1.1 unknown") == "smtp: 550 5.1.1 unknown"
    assert reason_of(None, "history") == "history"
    assert reason_of("render", None) == "render"
    assert reason_of(None, None) is None


def test_dead_letter_rows_name_the_record() -> None:
    letter = DeadLetter(("ticket-activities", 2, 77), "render", "bad", "1042", "e-1", at=0.0)
    assert dead_letter_json(letter) == {
        "ticket": "1042",
        "event": "e-1",
        "stage": "render",
        "reason": "bad",
        "at": "1970-01-01T00:00:00Z",
        "topic": "ticket-activities",
        "partition": 2,
        "offset": 77,
    }


def test_iso_utc_ends_in_z() -> None:
    assert iso_utc(1_795_000_000.9) == "2026-11-18T11:06:40Z"  # truncated, not rounded


def test_every_path_has_a_bounded_endpoint_label() -> None:
    assert {endpoint_of(p) for p in PATHS} == set(ENDPOINTS)
    assert endpoint_of("/elsewhere") == "other"


def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every check goes through hmac.compare_digest with inputs of one length, whatever is
    # presented: so neither the time nor an early exit tells how much of a guess was right.
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(service.runtime.audit.auth.hmac, "compare_digest", spy)
    token = Token("s3cret-audit-token")
    assert token.matches("s3cret-audit-token")
    assert not token.matches("s3cret-audit-tokeN")
    assert not token.matches("")
    assert not token.matches("x" * 10_000)
    assert not token.matches("s3cret-audit-token ")
    assert calls == [(32, 32)] * 5


def test_the_page_cookie_is_not_the_token_and_follows_it() -> None:
    token = Token("s3cret-audit-token")
    value = token.cookie_value()
    assert "s3cret" not in value
    assert value != hashlib.sha256(b"s3cret-audit-token").hexdigest()
    assert token.cookie_matches(value)
    assert not token.cookie_matches("s3cret-audit-token")
    # A new token ends every page session.
    assert not Token("another-audit-token").cookie_matches(value)
