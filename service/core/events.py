"""Pydantic models of the ticket-activity CloudEvent, and parsing of Kafka messages into them."""

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from service.core.failures import Failure, Stage
from service.core.fields import (
    Email,
    Identifier,
    Line,
    Locale,
    OptionalDate,
    OptionalIdentifier,
    OptionalTime,
    PresetText,
    Text,
    Timestamp,
    Tokens,
    YesNo,
    describe,
)

EventType = Literal["ticketActivity.created", "ticketActivity.updated"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
DEFAULT_SOURCE = "/backend/api/v1/ticketActivities"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
MAX_EVENT_BYTES = 10 * 1024 * 1024

_NonEmpty = Annotated[str, StringConstraints(strict=True, min_length=1)]
_OptionalStr = Annotated[str | None, StringConstraints(strict=True)]


class Customer(BaseModel):
    """The customer of a ticket, as sent in `data.ticket.customer` or kept in the directory."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    name: Line = ""
    email: Email
    locale: Locale = "en"


class Ticket(BaseModel):
    """Ticket context: reference and subject for the mail, and the customer to write to."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    id: Identifier
    reference: Line = ""
    subject: Line = ""
    customer: Customer | None = None


class Activity(BaseModel):
    """One ticket activity, exactly the fields of the backend API (ticket-activity.md)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    id: Identifier
    ticket_id: Identifier = Field(alias="ticketID")
    parent_activity: OptionalIdentifier = Field(default=None, alias="parentActivity")
    ticket_activity_type: PresetText = Field(default=None, alias="ticketActivityType")
    activity_user: PresetText = Field(default=None, alias="activityUser")
    contains_personal_data: YesNo = Field(default=False, alias="containsPersonalData")
    activity_text: Text = Field(default="", alias="activityText")
    send_content_by_email: YesNo = Field(default=False, alias="sendContentByEmail")
    comment_text: Text = Field(default="", alias="commentText")
    update_text: Text = Field(default="", alias="updateText")
    send_update_by_email: YesNo = Field(default=False, alias="sendUpdateByEmail")
    activity_departments: Tokens = Field(default=(), alias="activityDepartments")
    activity_users: Tokens = Field(default=(), alias="activityUsers")
    activity_suppliers: Tokens = Field(default=(), alias="activitySuppliers")
    standard_ticket_attachments: Tokens = Field(default=(), alias="standardTicketAttachments")
    this_ticket_attachments: Tokens = Field(default=(), alias="thisTicketAttachments")
    invoice_attachments: Tokens = Field(default=(), alias="invoiceAttachments")
    activity_date: OptionalDate = Field(default=None, alias="activityDate")
    response_received_date: OptionalDate = Field(default=None, alias="responseReceivedDate")
    response_acknowledged_date: OptionalDate = Field(default=None, alias="responseAcknowledgedDate")
    action_taken_date: OptionalDate = Field(default=None, alias="actionTakenDate")
    action_required_date: OptionalDate = Field(default=None, alias="actionRequiredDate")
    action_required_time: OptionalTime = Field(default=None, alias="actionRequiredTime")
    followup_date: OptionalDate = Field(default=None, alias="followupDate")
    followup_time: OptionalTime = Field(default=None, alias="followupTime")

    def to_wire(self) -> dict[str, Any]:
        """The activity as the API spells it: camelCase keys, JSON-able values."""
        return self.model_dump(mode="json", by_alias=True)


class EventData(BaseModel):
    """The CloudEvent's `data`: the activity, plus optional ticket context."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    activity: Activity
    ticket: Ticket | None = None

    @model_validator(mode="before")
    @classmethod
    def _ticket_id_from_activity(cls, value: Any) -> Any:
        # `data.ticket.id` may be left out: it is the activity's ticketID.
        if isinstance(value, Mapping):
            ticket, activity = value.get("ticket"), value.get("activity")
            if isinstance(ticket, Mapping) and "id" not in ticket and isinstance(activity, Mapping):
                ticket_id = activity.get("ticketID", activity.get("ticket_id"))
                return {**value, "ticket": {**ticket, "id": ticket_id}}
        return value

    @model_validator(mode="after")
    def _ticket_matches_activity(self) -> "EventData":
        # A mismatched ticket would mail the activity to another ticket's customer.
        if self.ticket is not None and self.ticket.id != self.activity.ticket_id:
            raise PydanticCustomError(
                "ticket_mismatch",
                "ticket.id {ticket} does not match activity.ticketID {activity}",
                {"ticket": describe(self.ticket.id), "activity": describe(self.activity.ticket_id)},
            )
        return self


class ActivityEvent(BaseModel):
    """A CloudEvents 1.0 event carrying one ticket activity."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: EventType
    subject: _OptionalStr = None
    time: Timestamp = None
    datacontenttype: _OptionalStr = None
    data: EventData

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if value not in EVENT_TYPES:
            raise PydanticCustomError(
                "unknown_type", "unknown event type: {type}", {"type": describe(value)}
            )
        return value


class InvalidEvent(Exception):
    """A message that is not a valid activity event; its failure says where and why."""

    def __init__(self, stage: Stage | str, reason: str) -> None:
        self.failure = Failure.of(Stage(stage), reason)
        super().__init__(f"{self.failure.stage}: {self.failure.reason}")

    @property
    def stage(self) -> Stage:
        return self.failure.stage

    @property
    def reason(self) -> str:
        return self.failure.reason


def parse_event(
    value: bytes | None, headers: Mapping[str, bytes | str], *, max_bytes: int = MAX_EVENT_BYTES
) -> ActivityEvent:
    """Parse one Kafka message (structured or binary CloudEvents mode); raise InvalidEvent.

    Structured events may carry their data in `data` or `data_base64`; only JSON data
    (by `datacontenttype`, absent meaning JSON) is served.
    """
    try:
        return _parse(value, headers, max_bytes)
    except InvalidEvent:
        raise
    except Exception as exc:  # the consumer must always get a dead-letterable InvalidEvent
        raise InvalidEvent("decode", f"internal error: {type(exc).__name__}") from exc


def _parse(
    value: bytes | None, headers: Mapping[str, bytes | str], max_bytes: int
) -> ActivityEvent:
    attributes = _header_attributes(headers)
    content_type = attributes.pop("content-type", "").strip()
    lowered = content_type.lower()
    if lowered.startswith("application/cloudevents-batch"):
        raise InvalidEvent("cloudevent", "batch mode is not supported")
    if lowered.startswith("application/cloudevents"):
        envelope = _structured(_decode(value, max_bytes), "", max_bytes)
    elif "specversion" in attributes and content_type and not is_json_media_type(content_type):
        # Binary mode whose data is not JSON: refused before the value is even read.
        raise InvalidEvent("cloudevent", _not_json(content_type))
    else:
        body = _decode(value, max_bytes)
        if isinstance(body, dict) and "specversion" in body:
            # Structured mode labelled with its data's media type, as the CloudEvents SDK's
            # Kafka binding labels it (`content-type: application/json`): the header is then
            # the event's datacontenttype.
            envelope = _structured(body, content_type, max_bytes)
        elif "specversion" in attributes:
            envelope = {**attributes, "data": body}
            if content_type:
                envelope.setdefault("datacontenttype", content_type)
        else:
            raise InvalidEvent("cloudevent", "not a CloudEvent: no specversion")
    _check_data_type(envelope)
    try:
        return ActivityEvent.model_validate(envelope)
    except ValidationError as exc:
        raise _invalid(
            exc.errors(include_url=False, include_context=False, include_input=False)
        ) from None
    except RecursionError:
        raise InvalidEvent("activity", "data nested too deeply") from None


def is_json_media_type(media_type: str) -> bool:
    """`application/json`, `text/json` or any `+json` type (RFC 6839), parameters ignored."""
    essence = media_type.partition(";")[0].strip().lower()
    kind, slash, subtype = essence.partition("/")
    if not (kind and slash and subtype):
        return False
    return essence in ("application/json", "text/json") or subtype.endswith("+json")


def _not_json(media_type: str) -> str:
    return f"datacontenttype {describe(media_type)} is not JSON; only JSON data is served"


def _structured(body: Any, header_type: str, max_bytes: int) -> dict[str, Any]:
    """The envelope of a structured-mode event, its `data_base64` decoded into `data`."""
    if not isinstance(body, dict):
        raise InvalidEvent("cloudevent", "not a JSON object")
    envelope = dict(body)
    if header_type and envelope.get("datacontenttype") is None:
        envelope["datacontenttype"] = header_type
    encoded = envelope.pop("data_base64", None)
    if encoded is None:
        return envelope
    # JSON event format §3.1.2: binary data travels base64-encoded in `data_base64`, never
    # beside `data`, and a receiver MUST decode it. Its media type is checked before the
    # bytes are read.
    if envelope.get("data") is not None:
        raise InvalidEvent("cloudevent", "both data and data_base64 are set")
    if not isinstance(encoded, str):
        raise InvalidEvent("cloudevent", f"data_base64: not a string: {describe(encoded)}")
    _check_data_type(envelope)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidEvent("cloudevent", "data_base64: not valid base64") from None
    try:
        envelope["data"] = _decode(raw, max_bytes)
    except InvalidEvent as exc:
        raise InvalidEvent(exc.stage, f"data_base64: {exc.reason}") from None
    return envelope


def _check_data_type(envelope: Mapping[str, Any]) -> None:
    """Only JSON data is served; an absent (or blank) datacontenttype means JSON."""
    media_type = envelope.get("datacontenttype")
    if isinstance(media_type, str) and media_type.strip() and not is_json_media_type(media_type):
        raise InvalidEvent("cloudevent", _not_json(media_type))


def _decode(value: bytes | None, max_bytes: int) -> Any:
    if value is None or len(value) == 0:
        raise InvalidEvent("decode", "empty message")
    if len(value) > max_bytes:
        raise InvalidEvent("decode", f"message too large: {len(value)} bytes (limit {max_bytes})")
    try:
        text = bytes(value).decode("utf-8-sig")  # a BOM is tolerated
    except UnicodeDecodeError as exc:
        raise InvalidEvent("decode", f"not UTF-8 (byte {exc.start})") from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(
            "decode", f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent("decode", f"not JSON: {type(exc).__name__}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every event: json.loads with an option builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _header_attributes(headers: Mapping[str, bytes | str]) -> dict[str, str]:
    """CloudEvents attributes from Kafka headers (`ce_*`, and `content-type`)."""
    attributes: dict[str, str] = {}
    for raw_name, raw_value in headers.items():
        name = str(raw_name).lower()
        if name.startswith("ce_"):
            key = name[3:]
        elif name == "content-type":
            key = name
        else:
            continue
        if isinstance(raw_value, bytes | bytearray):
            try:
                attributes[key] = bytes(raw_value).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidEvent("cloudevent", f"header {name[:40]}: not UTF-8") from None
        else:
            attributes[key] = str(raw_value)
    return attributes


def _invalid(errors: list[ErrorDetails]) -> InvalidEvent:
    """The most telling error: envelope problems first, then the type, then the activity."""

    def stage(error: ErrorDetails) -> str:
        loc = error["loc"]
        if loc and loc[0] == "data":
            return "activity"
        if loc and loc[0] == "type" and error["type"] != "missing":
            return "type"
        return "cloudevent"

    order = ("cloudevent", "type", "activity")
    first = min(errors, key=lambda error: order.index(stage(error)))
    path = ".".join(f"[{part}]" if isinstance(part, int) else part for part in first["loc"])
    message = "missing" if first["type"] == "missing" else first["msg"]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return InvalidEvent(stage(first), f"{path.replace('.[', '[')}: {message}{more}")


def cloudevent_for(
    activity: Activity | Mapping[str, Any],
    *,
    type: str = "ticketActivity.created",
    source: str = DEFAULT_SOURCE,
    ticket: Ticket | None = None,
    event_id: str | None = None,
    time: dt.datetime | None = None,
) -> dict[str, Any]:
    """The structured-mode CloudEvent (a JSON-able dict) a producer publishes for an activity.

    A Mapping is published as it is (wire shape), so lenient variants can be sent too; `type`
    is not checked, so that tests can publish unknown types.
    """
    wire = activity.to_wire() if isinstance(activity, Activity) else dict(activity)
    data: dict[str, Any] = {"activity": wire}
    if ticket is not None:
        data["ticket"] = ticket.model_dump(mode="json", exclude_none=True)
    moment = time or dt.datetime.now(dt.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": type,
        "time": moment.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
    ticket_id = wire.get("ticketID", wire.get("ticket_id"))
    if ticket_id is not None:
        event["subject"] = str(ticket_id).strip()
    return event
