"""The committed AsyncAPI document is the one FastStream generates from the models."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.runtime.asyncapi import asyncapi_yaml

DOC = Path(__file__).parent.parent / "docs" / "asyncapi.yaml"


def test_committed_document_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == asyncapi_yaml(), (
        "docs/asyncapi.yaml is stale: run `notifier asyncapi --out docs/asyncapi.yaml`"
    )


def test_document_describes_topic_and_event_schema() -> None:
    doc = yaml.safe_load(asyncapi_yaml())
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert addresses == {"ticket-activities", "ticket-activities.dlq"}
    schemas = doc["components"]["schemas"]
    event = schemas["ActivityEvent"]
    assert {"specversion", "id", "source", "type", "data"} <= set(event["properties"])
    activity = schemas["Activity"]["properties"]
    for field in (
        "ticketID",
        "sendContentByEmail",
        "commentText",
        "activitySuppliers",
        "invoiceAttachments",
        "followupTime",
    ):
        assert field in activity
