"""Tests of core.events: lenient activity fields, both CloudEvents modes, every error stage."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.core.events import (
    Activity,
    ActivityEvent,
    Customer,
    InvalidEvent,
    Ticket,
    cloudevent_for,
    parse_event,
)
from tests.strategies import activities, wire_activity_pairs, wire_events

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "events"
BASE = {"id": "5001", "ticketID": "1042"}


def activity(**fields: Any) -> Activity:
    return Activity.model_validate({**BASE, **fields})


def event_bytes(activity_fields: dict[str, Any] | None = None, **envelope: Any) -> bytes:
    event = cloudevent_for({**BASE, **(activity_fields or {})}, event_id="e-1")
    event.update(envelope)
    return json.dumps(event).encode()


def failure(value: bytes | None, headers: dict[str, bytes | str] | None = None) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(value, headers or {})
    return caught.value


# --- presets -------------------------------------------------------------------------------

YES = [True, "Yes", "yes", "YES", " Yes ", "Y", "y", "true", "TRUE", "True", 1, "1"]
NO = [False, "No", "no", "N", "n", "false", "FALSE", 0, "0", None, ""]


@pytest.mark.parametrize("value", YES)
def test_yes_no_preset_accepts_every_yes_spelling(value: Any) -> None:
    assert activity(sendContentByEmail=value).send_content_by_email is True


@pytest.mark.parametrize("value", NO)
def test_yes_no_preset_accepts_every_no_spelling_and_unset(value: Any) -> None:
    assert activity(sendContentByEmail=value).send_content_by_email is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"id": 2, "name": "Yes"}, True),
        ({"id": 3, "name": "No"}, False),
        ({"id": 2, "value": True}, True),
        ({"id": 2, "label": "Y"}, True),
        ({"id": 2, "name": None, "value": "yes", "label": "No"}, True),
        ({"id": 2, "name": "No", "value": "yes"}, False),  # name wins over value
        ({"id": 2, "name": None}, False),  # an unset preset object
    ],
)
def test_yes_no_preset_objects_use_name_then_value_then_label(value: Any, expected: bool) -> None:
    assert activity(containsPersonalData=value).contains_personal_data is expected


@pytest.mark.parametrize(
    "value", ["maybe", "si", 2, -1, 1.0, [], ["Yes"], {"id": 2}, {"name": "perhaps"}]
)
def test_yes_no_preset_rejects_anything_else_naming_the_field(value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        activity(sendUpdateByEmail=value)
    assert caught.value.errors()[0]["loc"] == ("sendUpdateByEmail",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("E-mail", "E-mail"),
        ("  Phone call ", "Phone call"),
        ({"id": 1, "name": "Note"}, "Note"),
        ({"id": 1, "value": "Note"}, "Note"),
        ({"id": 1, "label": "Note"}, "Note"),
        ({"id": 1, "name": None}, None),
        (17, "17"),
        (None, None),
        ("", None),
    ],
)
def test_preset_text_fields_take_a_string_or_a_preset_object(value: Any, expected: Any) -> None:
    parsed = activity(ticketActivityType=value, activityUser=value)
    assert parsed.ticket_activity_type == expected
    assert parsed.activity_user == expected


@pytest.mark.parametrize("value", [True, 1.5, ["Note"], {"id": 1}])
def test_preset_text_fields_reject_other_shapes(value: Any) -> None:
    with pytest.raises(ValidationError, match="activityUser"):
        activity(activityUser=value)


# --- ids and texts -------------------------------------------------------------------------


def test_ids_accept_integers_and_strings_normalised_to_text() -> None:
    parsed = Activity.model_validate({"id": 5001, "ticketID": " 1042 ", "parentActivity": 4999})
    assert (parsed.id, parsed.ticket_id, parsed.parent_activity) == ("5001", "1042", "4999")


@pytest.mark.parametrize("value", [None, "", "  "])
def test_parent_activity_null_or_blank_is_none(value: Any) -> None:
    assert activity(parentActivity=value).parent_activity is None


@pytest.mark.parametrize("value", [None, "", True, 1.5, [], {}, "a\r\nb", "x" * 500])
def test_ticket_id_must_be_a_usable_id(value: Any) -> None:
    with pytest.raises(ValidationError, match="ticketID"):
        Activity.model_validate({"id": "1", "ticketID": value})


def test_text_fields_null_is_empty_and_other_types_are_errors() -> None:
    parsed = activity(activityText=None, commentText=None, updateText=None)
    assert (parsed.activity_text, parsed.comment_text, parsed.update_text) == ("", "", "")
    with pytest.raises(ValidationError, match="commentText"):
        activity(commentText=42)


# --- list fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice", ("alice",)),
        ("alice, bob", ("alice", "bob")),
        ("alice;bob", ("alice", "bob")),
        ("alice\nbob\r\ncarol", ("alice", "bob", "carol")),
        (" alice ;; , bob ,\n", ("alice", "bob")),
        ("Customer Support; billing", ("Customer Support", "billing")),
        (["alice", " bob ", ""], ("alice", "bob")),
        ([{"id": 1, "name": "alice"}, 7], ("alice", "7")),
        ([], ()),
        ("", ()),
        (" , ; ", ()),
        (None, ()),
    ],
)
def test_list_fields_split_text_or_take_json_arrays(value: Any, expected: tuple[str, ...]) -> None:
    parsed = activity(activityUsers=value, invoiceAttachments=value)
    assert parsed.activity_users == expected
    assert parsed.invoice_attachments == expected


@pytest.mark.parametrize("value", [5, True, {"a": 1}, [["nested"]], [None]])
def test_list_fields_reject_other_shapes(value: Any) -> None:
    with pytest.raises(ValidationError, match="activitySuppliers"):
        activity(activitySuppliers=value)


# --- dates and times -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-27", dt.date(2026, 11, 27)),
        ("2026-11-27T09:15:00Z", dt.datetime(2026, 11, 27, 9, 15, tzinfo=dt.UTC)),
        ("2026-11-27T09:15:00+01:00", dt.datetime(2026, 11, 27, 8, 15, tzinfo=dt.UTC)),
        ("2026-11-27T09:15:00", dt.datetime(2026, 11, 27, 9, 15)),
        ("2026-11-27 09:15", dt.datetime(2026, 11, 27, 9, 15)),
        ("", None),
        (None, None),
    ],
)
def test_dates_are_iso_dates_or_datetimes_and_blank_is_unset(value: Any, expected: Any) -> None:
    parsed = activity(activityDate=value, followupDate=value)
    assert parsed.activity_date == expected
    assert type(parsed.activity_date) is type(expected)
    assert parsed.followup_date == expected


@pytest.mark.parametrize("value", ["27.11.2026", "2026-13-01", "tomorrow", 20261127, True, []])
def test_invalid_dates_are_errors_naming_the_field(value: Any) -> None:
    with pytest.raises(ValidationError, match="actionRequiredDate"):
        activity(actionRequiredDate=value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("14:30", dt.time(14, 30)),
        ("14:30:15", dt.time(14, 30, 15)),
        ("09:05", dt.time(9, 5)),
        ("9:05", dt.time(9, 5)),
        ("00:00", dt.time(0, 0)),
        ("23:59:59", dt.time(23, 59, 59)),
        ("", None),
        (None, None),
    ],
)
def test_times_are_hh_mm_or_hh_mm_ss(value: Any, expected: Any) -> None:
    parsed = activity(actionRequiredTime=value, followupTime=value)
    assert (parsed.action_required_time, parsed.followup_time) == (expected, expected)


@pytest.mark.parametrize(
    "value", ["24:00", "14:60", "2:30 pm", "1430", "14:30:00.5", 1430, "١٤:٣٠"]
)
def test_invalid_times_are_errors_naming_the_field(value: Any) -> None:
    with pytest.raises(ValidationError, match="followupTime"):
        activity(followupTime=value)


# --- the model -----------------------------------------------------------------------------


def test_unknown_fields_are_ignored_and_python_names_work_too() -> None:
    parsed = activity(createdAt="2026-11-27", someNewField=[1, 2])
    assert parsed == Activity(id="5001", ticket_id="1042")
    assert not hasattr(parsed, "someNewField")


def test_activity_is_frozen() -> None:
    with pytest.raises(ValidationError):
        activity().id = "other"  # type: ignore[misc]


def test_to_wire_spells_fields_as_the_api_does() -> None:
    wire = activity(sendContentByEmail="Yes", activityUsers="a;b").to_wire()
    assert wire["ticketID"] == "1042"
    assert wire["sendContentByEmail"] is True
    assert wire["activityUsers"] == ["a", "b"]
    assert "ticket_id" not in wire


@given(wire_activity_pairs())
def test_every_wire_variant_parses_to_the_expected_activity(
    pair: tuple[dict[str, Any], Activity],
) -> None:
    wire, expected = pair
    event = parse_event(json.dumps(cloudevent_for(wire)).encode(), {})
    assert event.data.activity == expected


@given(activities())
def test_cloudevent_for_round_trips(original: Activity) -> None:
    assert parse_event(json.dumps(cloudevent_for(original)).encode(), {}).data.activity == original


# --- CloudEvents modes ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_example_events_parse(path: Path) -> None:
    event = parse_event(path.read_bytes(), {"content-type": b"application/cloudevents+json"})
    assert event.data.activity.ticket_id == event.subject


def test_structured_mode_with_or_without_content_type_header() -> None:
    value = event_bytes({"sendContentByEmail": "Yes"})
    for headers in ({}, {"content-type": "application/cloudevents+json; charset=utf-8"}):
        event = parse_event(value, headers)
        assert event.id == "e-1"
        assert event.type == "ticketActivity.created"
        assert event.data.activity.send_content_by_email is True


def binary_headers(**overrides: bytes | str) -> dict[str, bytes | str]:
    headers: dict[str, bytes | str] = {
        "ce_specversion": b"1.0",
        "ce_id": b"e-2",
        "ce_type": b"ticketActivity.updated",
        "ce_source": "/backend/api/v1/ticketActivities",
        "ce_time": b"2026-11-27T09:15:00Z",
        "ce_subject": "1042",
        "content-type": b"application/json",
    }
    headers.update(overrides)
    return headers


def test_binary_mode_reads_attributes_from_headers_bytes_or_str() -> None:
    data = {"activity": {**BASE, "activityUsers": "alice"}, "ticket": {"reference": "T-1042"}}
    event = parse_event(json.dumps(data).encode(), binary_headers())
    assert (event.id, event.type, event.subject) == ("e-2", "ticketActivity.updated", "1042")
    assert event.time == dt.datetime(2026, 11, 27, 9, 15, tzinfo=dt.UTC)
    assert event.datacontenttype == "application/json"
    assert event.data.ticket == Ticket(id="1042", reference="T-1042")


def base64_event(payload: bytes, **envelope: Any) -> bytes:
    event = cloudevent_for(BASE, event_id="e-3")
    del event["data"]
    event["data_base64"] = base64.b64encode(payload).decode("ascii")
    event.update(envelope)
    return json.dumps(event).encode()


def test_data_base64_is_decoded_and_read_as_json() -> None:
    # JSON event format §3.1.2: a receiver MUST decode data_base64.
    data = {"activity": {**BASE, "sendUpdateByEmail": "Yes", "updateText": "Teile bestellt"}}
    for headers in ({}, {"content-type": "application/cloudevents+json"}):
        event = parse_event(base64_event(json.dumps(data).encode()), headers)
        assert event.id == "e-3"
        assert event.data.activity.update_text == "Teile bestellt"
    no_type = parse_event(base64_event(json.dumps(data).encode(), datacontenttype=None), {})
    assert no_type.data.activity.send_update_by_email is True


def test_structured_mode_labelled_with_the_data_type_takes_it_as_datacontenttype() -> None:
    # The SDK's 1.x Kafka binding moves datacontenttype into the content-type header.
    event = cloudevent_for(BASE, event_id="e-4")
    del event["datacontenttype"]
    parsed = parse_event(json.dumps(event).encode(), {"content-type": b"text/json"})
    assert parsed.datacontenttype == "text/json"
    refused = failure(json.dumps(event).encode(), {"content-type": b"application/xml"})
    assert refused.stage == "cloudevent"
    assert "'application/xml' is not JSON" in refused.reason


@pytest.mark.parametrize(
    ("value", "stage", "reason"),
    [
        (
            base64_event(b"<activity/>", datacontenttype="application/xml"),
            "cloudevent",
            "is not JSON",
        ),
        (
            base64_event(b"\x00\x01", datacontenttype="application/octet-stream"),
            "cloudevent",
            "is not JSON",
        ),
        (base64_event(b"{}", data={"activity": BASE}), "cloudevent", "both data and data_base64"),
        (event_bytes(data_base64=17, data=None), "cloudevent", "data_base64: not a string"),
        (event_bytes(data_base64="not base64!", data=None), "cloudevent", "not valid base64"),
        (base64_event(b"not json"), "decode", "data_base64: not JSON"),
        (base64_event(b"\xff\xfe"), "decode", "data_base64: not UTF-8"),
        (base64_event(b""), "decode", "data_base64: empty"),
        (base64_event(b'{"ticket": null}'), "activity", "data.activity: missing"),
    ],
)
def test_data_base64_errors_have_a_stage_and_a_clear_reason(
    value: bytes, stage: str, reason: str
) -> None:
    caught = failure(value)
    assert caught.stage == stage
    assert reason in caught.reason


@pytest.mark.parametrize(
    "media_type",
    ["application/json", "application/json; charset=utf-8", "TEXT/JSON", "application/ld+json"],
)
def test_json_media_types_are_served_in_both_modes(media_type: str) -> None:
    assert parse_event(event_bytes(datacontenttype=media_type), {}).id == "e-1"
    data = json.dumps({"activity": BASE}).encode()
    assert parse_event(data, binary_headers(**{"content-type": media_type})).id == "e-2"


@pytest.mark.parametrize("media_type", ["text/plain", "application/xml", "json", "application/"])
def test_other_media_types_are_cloudevent_errors_in_both_modes(media_type: str) -> None:
    for caught in (
        failure(event_bytes(datacontenttype=media_type)),
        failure(b"Printer jams", binary_headers(**{"content-type": media_type})),
    ):
        assert caught.stage == "cloudevent"
        assert caught.reason == (
            f"datacontenttype {media_type!r} is not JSON; only JSON data is served"
        )


def test_ticket_context_is_optional_and_must_match_the_activity() -> None:
    assert parse_event(event_bytes(), {}).data.ticket is None
    customer = {"name": "Dana", "email": "dana@customer.test", "locale": "de"}
    ticket = {"id": "1042", "reference": "T-1042", "customer": customer}
    parsed = parse_event(event_bytes(data={"activity": BASE, "ticket": ticket}), {})
    assert parsed.data.ticket is not None
    assert parsed.data.ticket.customer == Customer(
        name="Dana", email="dana@customer.test", locale="de"
    )
    wrong = failure(event_bytes(data={"activity": BASE, "ticket": {**ticket, "id": "1043"}}))
    assert wrong.stage == "activity"
    assert "ticket.id" in wrong.reason


def test_customer_email_is_validated_and_locale_falls_back_to_english() -> None:
    assert Customer(email="d@x.test", locale="not a locale!").locale == "en"
    assert Customer(email="d@x.test", locale=None).locale == "en"  # type: ignore[arg-type]
    for bad in ["dana", "a@b.test\r\nBcc: x@y.test", "a b@c.test", "a@b.test, c@d.test"]:
        with pytest.raises(ValidationError, match="email"):
            Customer(email=bad)


# --- errors, by stage ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [None, b"", b"\xff\xfe{", b"{", b"not json", b'{"a": NaN}', b"[" * 200_000]
)
def test_decode_stage(value: bytes | None) -> None:
    assert failure(value).stage == "decode"


def test_oversized_messages_are_refused_without_parsing() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(b" " * 100 + event_bytes(), {}, max_bytes=100)
    assert caught.value.stage == "decode"


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        (b"[1, 2]", {"content-type": "application/cloudevents+json"}),
        (b'{"activity": {}}', {}),
        (event_bytes(specversion="0.3"), {}),
        (event_bytes(id=""), {}),
        (event_bytes(id=17), {}),
        (event_bytes(source=None), {}),
        (event_bytes(time="yesterday"), {}),
        (
            json.dumps(
                {"specversion": "1.0", "id": "x", "type": "ticketActivity.created"}
            ).encode(),
            {},
        ),
        (b'{"activity": {}}', binary_headers(ce_id=b"\xff")),
        (b'{"activity": {}}', {"ce_specversion": "1.0", "ce_type": "ticketActivity.created"}),
    ],
)
def test_cloudevent_stage(value: bytes, headers: dict[str, bytes | str]) -> None:
    assert failure(value, headers).stage == "cloudevent"


@pytest.mark.parametrize("kind", ["ticketActivity.deleted", "ticket.created", "", 5])
def test_type_stage(kind: Any) -> None:
    caught = failure(event_bytes(type=kind))
    assert caught.stage == "type"
    assert caught.reason.startswith("type: unknown event type")


def test_activity_stage_names_the_field_path() -> None:
    caught = failure(event_bytes({"sendContentByEmail": "maybe"}))
    assert caught.stage == "activity"
    assert caught.reason == "data.activity.sendContentByEmail: not a yes/no value: 'maybe'"


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (event_bytes(data=None), "data"),
        (event_bytes(data={"ticket": None}), "data.activity"),
        (event_bytes(data={"activity": {"id": "1"}}), "data.activity.ticketID"),
        (
            event_bytes(data={"activity": BASE, "ticket": {"customer": {"email": "x"}}}),
            "data.ticket",
        ),
    ],
)
def test_activity_stage_for_missing_or_invalid_data(value: bytes, path: str) -> None:
    caught = failure(value)
    assert caught.stage == "activity"
    assert caught.reason.startswith(path)


def test_reasons_are_short_single_lines_without_user_texts() -> None:
    secret = "SECRET customer complaint " * 50
    caught = failure(event_bytes({"activityText": secret, "sendContentByEmail": secret}))
    assert caught.stage == "activity"
    assert caught.reason.isprintable()
    assert len(caught.reason) <= 200
    assert secret[:60] not in caught.reason
    caught = failure(event_bytes({"commentText": {"text": secret}}))
    assert "SECRET" not in caught.reason
    caught = failure(event_bytes({"followupTime": "1\r\n2"}))
    assert caught.reason.isprintable()  # no CR, LF or other controls


def test_invalid_event_reasons_are_always_cleaned_and_capped() -> None:
    error = InvalidEvent("activity", "line one\r\nline two\u2028" + "x" * 500)
    assert error.reason.isprintable()
    assert len(error.reason) == 200
    headers = binary_headers(**{"ce_\nid\r": b"\xff"})
    assert failure(b'{"activity": {}}', headers).reason.isprintable()


def test_activity_event_model_rejects_unknown_types() -> None:
    with pytest.raises(ValidationError):
        ActivityEvent.model_validate(
            {
                "specversion": "1.0",
                "id": "1",
                "source": "/s",
                "type": "x",
                "data": {"activity": BASE},
            }
        )


# --- fuzzing: only InvalidEvent, ever ------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


def assert_parses_or_invalid(value: bytes, headers: dict[str, bytes | str]) -> None:
    error: InvalidEvent | None = None
    try:
        parse_event(value, headers)
    except InvalidEvent as exc:
        error = exc
    if error is not None:
        assert error.stage in {"decode", "cloudevent", "type", "activity"}
        assert not error.reason.startswith("internal error"), error.reason
        assert len(error.reason) <= 200
        assert error.reason.isprintable()


@given(st.binary(max_size=300), st.sampled_from([{}, binary_headers()]))
def test_arbitrary_bytes_only_raise_invalid_event(
    value: bytes, headers: dict[str, bytes | str]
) -> None:
    assert_parses_or_invalid(value, headers)


@given(JSON, st.sampled_from([{}, binary_headers()]))
def test_arbitrary_json_only_raises_invalid_event(
    value: Any, headers: dict[str, bytes | str]
) -> None:
    assert_parses_or_invalid(json.dumps(value).encode(), headers)


@given(wire_events(), st.data())
def test_mutated_events_only_raise_invalid_event(value: bytes, data: st.DataObject) -> None:
    event = json.loads(value)
    target = data.draw(st.sampled_from([event, event["data"], event["data"]["activity"]]))
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=10))
    target[key] = data.draw(JSON)
    assert_parses_or_invalid(json.dumps(event).encode(), {})


@pytest.mark.parametrize(
    "value",
    [
        b'{"specversion": "1.0", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        event_bytes({"activityUsers": [[[[[[["deep"]]]]]]]}),
        event_bytes({"activityText": "x" * 5_000_000}),
        event_bytes({"id": 10**4000}),
        b'{"specversion": "1.0", "id": 1' + b"0" * 5000 + b"}",
    ],
)
def test_hostile_inputs_only_raise_invalid_event(value: bytes) -> None:
    assert_parses_or_invalid(value, {})
