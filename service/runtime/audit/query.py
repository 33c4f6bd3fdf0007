"""Audit query parameters checked: each bad one is named, with what it should be."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from service.delivery.ledger import Status
from service.runtime.audit.report import LIMIT_MAX

TEXT_MAX = 320
"""Longest id, address or token a filter takes (an address is at most 254 characters)."""
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"
"""Not empty, no control characters (PostgreSQL text cannot even hold NUL)."""


class BadParameter(ValueError):
    """A query parameter the audit cannot take; answered with 400 naming it."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter
        self.problem = problem


def check_names(items: Iterable[tuple[str, str]], known: Sequence[str]) -> None:
    """Refuse a parameter the endpoint does not know, or one given twice."""
    seen: set[str] = set()
    for name, _ in items:
        if name not in known:
            raise BadParameter(name, f"unknown parameter; known: {', '.join(known)}")
        if name in seen:
            raise BadParameter(name, "given more than once")
        seen.add(name)


def parse_since(value: str | None) -> float | None:
    """An ISO 8601 date or date-time as epoch seconds; one without a zone is UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadParameter(
            "since", "must be an ISO 8601 date or time, e.g. 2026-11-27T09:15:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def recipient_filter(value: str | None) -> str | None:
    """Addresses are stored lower-cased; tokens of `unresolved` rows as they came."""
    if value is not None and "@" in value:
        return value.lower()
    return value


STATUSES = ", ".join(s.value for s in Status)

_PROBLEMS: Mapping[str, str] = {
    "missing": "is required",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "greater_than_equal": f"must be from 1 to {LIMIT_MAX}",
    "less_than_equal": f"must be from 1 to {LIMIT_MAX}",
    "enum": f"must be one of: {STATUSES}",
    "string_too_long": f"must be at most {TEXT_MAX} characters",
    "string_pattern_mismatch": "must not be empty or hold control characters",
}


def from_validation(errors: Sequence[Any]) -> BadParameter:
    """The first of FastAPI's validation errors, as a BadParameter naming its parameter."""
    error = errors[0] if errors else {}
    loc = [str(part) for part in error.get("loc", ())]
    name = loc[-1] if loc else "request"
    kind = str(error.get("type", ""))
    problem = _PROBLEMS.get(kind) or str(error.get("msg", "invalid"))
    return BadParameter(name, problem)
