"""The failure vocabulary: where a record or a notification failed for good, and why."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.core.text import one_line

MAX_REASON_LENGTH = 200


class Stage(StrEnum):
    """Where a permanent failure happened: the dead letter's `x-error-stage` header."""

    DECODE = "decode"  # not UTF-8 JSON, empty, too large
    CLOUDEVENT = "cloudevent"  # not a CloudEvent, or one we cannot read (batch mode, data)
    TYPE = "type"  # an event type other than ticketActivity.created/updated
    ACTIVITY = "activity"  # the activity (or its ticket) fails validation
    RENDER = "render"  # a template failed
    ATTACHMENT = "attachment"  # refused, too large, or missing past the wait
    ADDRESS = "address"  # an address no header can carry
    SMTP = "smtp"  # the SMTP server refused the mail for good (5xx)
    THROTTLED = "throttled"  # the recipient's hourly limit (section 10): held for a replay


@dataclass(frozen=True, slots=True)
class Failure:
    """A permanent failure of a record or of one notification; `reason` is one short line."""

    stage: Stage
    reason: str

    @classmethod
    def of(cls, stage: Stage, reason: str) -> Failure:
        """A failure whose reason is made to fit a log line and a Kafka header."""
        return cls(stage, one_line(reason[: MAX_REASON_LENGTH * 2], MAX_REASON_LENGTH))
