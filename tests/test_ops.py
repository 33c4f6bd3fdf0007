"""Operations: metrics with bounded labels, /healthz, /readyz, /metrics, JSON logs without texts."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Set
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from faststream.asgi import AsgiFastStream
from faststream.kafka import TestKafkaBroker
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import service.delivery.dead_letters
import service.runtime.app
from devkit.config import service_env
from devkit.events import example, mixed_examples
from devkit.process import ServiceProcess, free_port
from devkit.smtp import SmtpRecorder
from devkit.waiting import poll
from service.runtime.logs import JsonFormatter
from service.runtime.metrics import Metrics
from service.runtime.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "notifier.json"
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# -- what the service may export -----------------------------------------------------------

KINDS = {
    "customer_content",
    "customer_update",
    "staff",
    "supplier",
    "followup_reminder",
    "action_reminder",
}
EVENT_TYPES = {"ticketActivity.created", "ticketActivity.updated", "invalid"}
EVENT_OUTCOMES = {"processed", "dead_lettered", "retry_later", "expired"}
NOTIFICATION_OUTCOMES = {
    "sent",
    "skipped_duplicate",
    "withheld",
    "unresolved",
    "failed_transient",
    "failed_permanent",
    "expired",
    "throttled",
}
STAGES = {
    "decode",
    "cloudevent",
    "type",
    "activity",
    "render",
    "attachment",
    "address",
    "smtp",
    "throttled",
}
SMTP_OUTCOMES = {"accepted", "transient", "permanent", "withheld", "error"}
AUDIT_ENDPOINTS = {"deliveries", "dead_letters", "openapi", "ui", "login", "logout", "static"}
VERSION = re.compile(r"^\d+(\.\d+)*([.+-][0-9A-Za-z.+-]*)?$")
SMALL_INT = re.compile(r"^\d{1,4}$")

Allowed = set[str] | re.Pattern[str]

# Every documented metric: exposed name → (type, {label: allowed values}).
DOCUMENTED: dict[str, tuple[str, dict[str, Allowed]]] = {
    "notifier_events_total": ("counter", {"type": EVENT_TYPES, "outcome": EVENT_OUTCOMES}),
    "notifier_notifications_total": (
        "counter",
        {"kind": KINDS | {"unknown"}, "outcome": NOTIFICATION_OUTCOMES},
    ),
    "notifier_dead_letters_total": ("counter", {"stage": STAGES}),
    "notifier_retries_total": ("counter", {}),
    "notifier_batch_rewinds_total": (
        "counter",
        {"reason": {"retry_later", "error", "rebalanced"}},
    ),
    "notifier_smtp_send_seconds": ("histogram", {"outcome": SMTP_OUTCOMES}),
    "notifier_render_seconds": ("histogram", {}),
    "notifier_delivery_latency_seconds": ("histogram", {}),
    "notifier_consumer_lag": ("gauge", {"partition": SMALL_INT}),
    "notifier_in_flight_notifications": ("gauge", {}),
    "notifier_smtp_pool_size": ("gauge", {}),
    "notifier_smtp_pool_connections": ("gauge", {"state": {"open", "busy"}}),
    "notifier_reminders_total": (
        "counter",
        {
            "action": {
                "scheduled",
                "moved",
                "cancelled",
                "expired",
                "orphaned",
                "sent",
                "failed",
            }
        },
    ),
    "notifier_reminder_next_due_timestamp_seconds": ("gauge", {}),
    "notifier_group_members": ("gauge", {}),
    "notifier_unsafe_ledger": ("gauge", {}),
    "notifier_audit_requests_total": (
        "counter",
        {"endpoint": AUDIT_ENDPOINTS, "code": re.compile(r"^[1-5]\d\d$")},
    ),
    "notifier_audit_request_seconds": ("histogram", {"endpoint": AUDIT_ENDPOINTS}),
    "notifier_audit_denied_total": (
        "counter",
        {"endpoint": AUDIT_ENDPOINTS, "reason": {"missing", "wrong"}},
    ),
    "notifier_build_info": ("gauge", {"version": VERSION, "python": VERSION}),
}

# FastStream's KafkaPrometheusMiddleware (prefix faststream_, app_name notifier).
FASTSTREAM_LABELS: dict[str, Allowed] = {
    "app_name": {"notifier"},
    "broker": {"kafka"},
    "status": {"acked", "nacked", "rejected", "skipped", "error", "success"},
    "exception_type": re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,80}$"),
}
FASTSTREAM_FAMILIES = {
    "faststream_received_messages_total",
    "faststream_received_messages_size_bytes",
    "faststream_received_messages_in_process",
    "faststream_received_processed_messages_total",
    "faststream_received_processed_messages_duration_seconds",
    "faststream_received_processed_messages_exceptions_total",
}

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum", "_created")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def documented_name(sample: str) -> str | None:
    """The documented metric a sample belongs to (`x_bucket` → `x`, `x_created` → `x_total`)."""
    for name, (kind, _) in DOCUMENTED.items():
        if sample == name:
            return name
        if (
            kind == "histogram"
            and sample.startswith(name)
            and sample[len(name) :] in (HISTOGRAM_SUFFIXES)
        ):
            return name
        if kind == "counter" and sample == name.removesuffix("_total") + "_created":
            return name
    return None


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def allowed(rule: Allowed, value: str) -> bool:
    return value in rule if isinstance(rule, set) else bool(rule.fullmatch(value))


def label_problems(text: str, topic: str, forbidden: Set[str] = frozenset()) -> list[str]:
    """Every label value outside its documented set, and every notifier_ sample not documented."""
    problems = []
    for name, labels, _ in samples(text):
        for value in labels.values():
            if "@" in value or UUID.search(value) or value in forbidden:
                problems.append(f"{name}{labels}: {value!r} looks like an id or an address")
        if name.startswith("notifier_"):
            doc = documented_name(name)
            if doc is None:
                problems.append(f"{name}: not a documented metric")
                continue
            rules = DOCUMENTED[doc][1]
            for label, value in labels.items():
                if label == "le" and DOCUMENTED[doc][0] == "histogram":
                    continue
                if label not in rules or not allowed(rules[label], value):
                    problems.append(f"{name}: label {label}={value!r} outside its bounded set")
        elif name.startswith("faststream_"):
            for label, value in labels.items():
                if label in ("handler", "destination"):
                    ok = value in (topic, f"{topic}.dlq")
                elif label == "le":
                    ok = True
                else:
                    ok = label in FASTSTREAM_LABELS and allowed(FASTSTREAM_LABELS[label], value)
                if not ok:
                    problems.append(f"{name}: label {label}={value!r} outside its bounded set")
    return problems


# -- events --------------------------------------------------------------------------------


def ids_and_addresses(events: list[dict[str, Any]]) -> set[str]:
    """Every id, reference, name and address the events carry, for 'not in a label' checks."""
    found: set[str] = set()
    for event in events:
        found.add(event["id"])
        act = event["data"]["activity"]
        found.update({str(act["id"]), str(act["ticketID"])})
        ticket = event["data"].get("ticket") or {}
        found.update(str(v) for k, v in ticket.items() if k in ("id", "reference"))
        customer = ticket.get("customer") or {}
        found.update(str(v) for k, v in customer.items() if k in ("name", "email"))
    directory = (EXAMPLES / "directory.yaml").read_text()
    found.update(re.findall(r"[\w.+-]+@[\w.-]+", directory))
    return found


class FakeProducer:
    """Stands in for the dead-letter AIOKafkaProducer, so TestKafkaBroker needs no broker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.sent.append((topic, value, key, list(headers or [])))


def settings_for(smtp_port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
        "topic": "ops-test",
        "dlq_topic": "ops-test.dlq",
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "smtp_timeout_seconds": 2.0,
        "directory_file": EXAMPLES / "directory.yaml",
        "attachments_dir": EXAMPLES / "attachments",
        "ledger_url": "memory://",
        "mail_from": "Helpdesk <helpdesk@helpdesk.test>",
    }
    values.update(overrides)
    return load_settings(**values)


def client(app: AsgiFastStream) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://notifier")


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> list[FakeProducer]:
    made: list[FakeProducer] = []

    def factory(*args: Any, **kwargs: Any) -> FakeProducer:
        made.append(FakeProducer())
        return made[-1]

    monkeypatch.setattr(service.delivery.dead_letters, "AIOKafkaProducer", factory)
    return made


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Root logger at INFO into a buffer through the service's JsonFormatter."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(old_level)


async def run_through_test_broker(
    app: AsgiFastStream, topic: str, messages: list[tuple[bytes, bytes, int]]
) -> str:
    """Start the app on TestKafkaBroker, publish (value, key, partition), return /metrics."""
    async with TestKafkaBroker(app.broker) as broker, client(app) as http:
        await app.start()
        try:
            for value, key, partition in messages:
                await broker.publish(value, topic, key=key, partition=partition)
            response = await http.get("/metrics")
        finally:
            await app.stop()
    return response.text


# -- metrics -------------------------------------------------------------------------------


def test_metrics_api_exports_every_documented_metric_with_bounded_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for event_type in ("ticketActivity.created", "ticketActivity.updated", "nonsense", None):
        for outcome in EVENT_OUTCOMES:
            metrics.event(event_type, outcome)
    for kind in KINDS:
        for outcome in NOTIFICATION_OUTCOMES - {"unresolved"}:
            metrics.notification(kind, outcome)
    metrics.notification("unknown", "unresolved")
    for stage in STAGES:
        metrics.dead_letter(stage)
    metrics.retry()
    for outcome in SMTP_OUTCOMES:
        metrics.send_finished(0.02, outcome)
    metrics.rendered(0.001)
    metrics.delivered(datetime.now(UTC))
    metrics.delivered(None)
    metrics.delivered(datetime(2026, 1, 1))  # naive: read as UTC
    metrics.lags(dict.fromkeys(range(4), 3))
    with metrics.in_flight():
        pass
    metrics.pool_size.set(8)
    metrics.watch_connections(lambda: (2, 1))

    text = generate_latest(registry).decode()
    exported = {name for name, _, _ in samples(text)}
    for name, (kind, _) in DOCUMENTED.items():
        wanted = f"{name}_count" if kind == "histogram" else name
        assert wanted in exported, f"{name} not exported"
    assert label_problems(text, topic="-") == []
    values = {(n, tuple(sorted(labels.items()))): v for n, labels, v in samples(text)}
    # A type the service does not know is counted as "invalid", never as itself.
    assert values[("notifier_events_total", (("outcome", "processed"), ("type", "invalid")))] == 2
    assert values[("notifier_in_flight_notifications", ())] == 0
    assert values[("notifier_smtp_pool_connections", (("state", "busy"),))] == 1


def test_label_check_catches_ids_and_addresses() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.notification("dana@customer.test", "sent")
    # dead_letter() takes a Stage now; the label check must still catch an id put there.
    metrics.dead_letters.labels("9b2f0c8e-6d0a-4c38-9a61-1f2f6f0e7a10").inc()
    metrics.notification("staff", "T-1042")
    problems = label_problems(generate_latest(registry).decode(), "-", forbidden={"T-1042"})
    for bad in ("dana@customer.test", "9b2f0c8e-6d0a-4c38-9a61-1f2f6f0e7a10", "T-1042"):
        assert any(bad in problem for problem in problems), (bad, problems)


async def test_labels_stay_bounded_after_processing_events(
    smtp_server: SmtpRecorder, fake_producer: list[FakeProducer]
) -> None:
    settings = settings_for(smtp_server.port)
    app = service.runtime.app.create_app(settings)
    events = mixed_examples()
    bad_type = example("01-customer-content.json")
    bad_type["type"] = "ticketActivity.deleted"
    # TestKafkaBroker gives every record offset 0; the ledger remembers dead letters by
    # (partition, offset), so each record that is dead-lettered gets a partition of its own.
    messages = [
        (json.dumps(e).encode(), str(e["data"]["activity"]["ticketID"]).encode(), 0) for e in events
    ]
    messages += [(b"{not json", b"1042", 1), (json.dumps(bad_type).encode(), b"1042", 2)]

    text = await run_through_test_broker(app, settings.topic, messages)

    assert smtp_server.messages, "nothing was sent: the events did not go through"
    values = {(n, tuple(sorted(labels.items()))): v for n, labels, v in samples(text)}
    assert values[("notifier_dead_letters_total", (("stage", "decode"),))] == 1
    assert values[("notifier_dead_letters_total", (("stage", "type"),))] == 1
    assert (
        values[("notifier_notifications_total", (("kind", "unknown"), ("outcome", "unresolved")))]
        >= 1
    )
    assert (
        values[("notifier_notifications_total", (("kind", "supplier"), ("outcome", "withheld")))]
        >= 1
    )
    assert values[("notifier_smtp_send_seconds_count", (("outcome", "accepted"),))] == len(
        smtp_server.messages
    )
    assert any(n == "faststream_received_messages_total" for n, _, _ in samples(text))
    forbidden = ids_and_addresses([*events, bad_type])
    assert label_problems(text, settings.topic, forbidden) == []
    assert not [v for v in forbidden if f'"{v}"' in text], "an id or address is a label value"
    # What dead letters carry is the record, never a reason quoting customer data in a label.
    assert {t for p in fake_producer for t, *_ in p.sent} == {settings.dlq_topic}
    assert sorted(v for p in fake_producer for _, v, _, _ in p.sent if v) == sorted(
        [b"{not json", json.dumps(bad_type).encode()]
    )


# -- endpoints -----------------------------------------------------------------------------


async def test_healthz_is_200_without_kafka_or_smtp() -> None:
    app = service.runtime.app.create_app(settings_for(smtp_port=free_port()))
    async with client(app) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200


async def test_readyz_is_503_naming_both_when_kafka_and_smtp_are_unreachable() -> None:
    app = service.runtime.app.create_app(settings_for(smtp_port=free_port()))
    async with client(app) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert "kafka unreachable" in response.text
    assert "smtp unreachable" in response.text


async def test_readyz_is_503_naming_kafka_when_only_kafka_is_unreachable(
    smtp_server: SmtpRecorder,
) -> None:
    app = service.runtime.app.create_app(settings_for(smtp_server.port))
    async with client(app) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert "kafka unreachable" in response.text
    assert "smtp" not in response.text


async def test_readyz_is_503_naming_smtp_when_only_smtp_is_unreachable(
    fake_producer: list[FakeProducer],
) -> None:
    app = service.runtime.app.create_app(settings_for(smtp_port=free_port()))
    # TestKafkaBroker's broker answers ping: only SMTP is down.
    async with TestKafkaBroker(app.broker), client(app) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert "smtp unreachable" in response.text
    assert "kafka" not in response.text


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    app = service.runtime.app.create_app(settings_for(smtp_port=free_port()))
    async with client(app) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain")
    assert "version=0.0.4" in content_type
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"notifier_build_info", "notifier_smtp_pool_size", "notifier_dead_letters"} <= names


# -- dashboard wiring ----------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def test_dashboard_uses_the_provisioned_datasource_uid() -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"] for d in provisioned if d["type"] == "prometheus"}
    assert len(uids) == 1
    dashboard = json.loads(DASHBOARD.read_text())
    refs = [p["datasource"] for p in dashboard_panels() if p["type"] != "row"]
    refs += [t["datasource"] for p in dashboard_panels() for t in p.get("targets", [])]
    refs += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert refs
    assert {(r["type"], r["uid"]) for r in refs} == {("prometheus", next(iter(uids)))}


def test_dashboard_panels_are_well_formed_and_documented() -> None:
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))
    readme = (REPO / "deploy" / "README.md").read_text()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["title"] in readme, f"panel {panel['title']!r} not in deploy/README.md"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_shows_every_documented_metric() -> None:
    text = "\n".join(dashboard_exprs())
    for name, (kind, _) in DOCUMENTED.items():
        assert (f"{name}_bucket" if kind == "histogram" else name) in text, name
    assert "faststream_" in text


# -- logs ----------------------------------------------------------------------------------


def test_json_formatter_writes_one_object_per_line_with_ids_and_no_exception_text() -> None:
    logger = logging.getLogger("test.ops")
    record = logger.makeRecord(
        "test.ops", logging.INFO, __file__, 1, "sent\nline two", None, None,
        extra={"event_id": "e-1", "activity_id": "5001", "ticket_id": "1042", "kind": "staff"},
    )  # fmt: skip
    try:
        raise ValueError("dana@customer.test is unhappy")
    except ValueError:
        import sys

        failed = logger.makeRecord(
            "test.ops", logging.ERROR, __file__, 2, "boom", None, sys.exc_info()
        )
    formatter = JsonFormatter()
    line = formatter.format(record)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["msg"] == "sent\nline two"
    assert {k: fields[k] for k in ("event_id", "activity_id", "ticket_id", "kind")} == {
        "event_id": "e-1",
        "activity_id": "5001",
        "ticket_id": "1042",
        "kind": "staff",
    }
    assert fields["level"] == "INFO"
    error = formatter.format(failed)
    assert "\n" not in error
    assert json.loads(error)["exc_type"] == "ValueError"
    assert "dana@customer.test" not in error


TEST_LOGGERS = {"mail.log", "httpx"}


def secret_event() -> tuple[dict[str, Any], dict[str, str]]:
    """Example 01 with unmistakable texts and customer, so any leak into a log is visible."""
    tag = uuid.uuid4().hex[:10]
    secrets = {
        "activity_text": f"ACTIVITY-TEXT-{tag} the quote is attached",
        "comment_text": f"COMMENT-TEXT-{tag} customer is difficult",
        "customer_email": f"dana.{tag}@customer.test",
        "customer_name": f"Dana Secretname{tag}",
    }
    event = example(
        "01-customer-content.json",
        id=f"act-{tag}",
        activityText=secrets["activity_text"],
        commentText=secrets["comment_text"],
    )
    event["id"] = f"evt-{tag}"
    event["data"]["ticket"]["customer"].update(
        email=secrets["customer_email"], name=secrets["customer_name"]
    )
    return event, secrets


def check_log_lines(
    records: list[dict[str, Any]], event: dict[str, Any], secrets: dict[str, str]
) -> None:
    """The event's INFO lines carry its ids and kinds; no INFO line carries a text or address."""
    act = event["data"]["activity"]
    sent = [r for r in records if r.get("event_id") == event["id"] and r.get("msg") == "sent"]
    assert sent, "no 'sent' line for the event"
    for r in sent:
        assert r["activity_id"] == act["id"]
        assert r["ticket_id"] == act["ticketID"]
        assert r["kind"] in KINDS
    assert {r["kind"] for r in sent} == {"customer_content", "staff"}
    for r in records:
        if r.get("level") in ("DEBUG", "INFO"):
            line = json.dumps(r, ensure_ascii=False)
            for what, secret in secrets.items():
                assert secret not in line, f"{what} in an INFO line: {line}"
        line = json.dumps(r, ensure_ascii=False)
        assert secrets["activity_text"] not in line, f"activity text logged: {line}"
        assert secrets["comment_text"] not in line, f"comment text logged: {line}"


async def test_logs_of_a_processed_event_carry_ids_and_never_texts(
    smtp_server: SmtpRecorder, fake_producer: list[FakeProducer], json_log: io.StringIO
) -> None:
    settings = settings_for(smtp_server.port)
    app = service.runtime.app.create_app(settings)
    event, secrets = secret_event()
    await run_through_test_broker(app, settings.topic, [(json.dumps(event).encode(), b"1042", 0)])
    lines = [line for line in json_log.getvalue().splitlines() if line]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in records)
    # The test's own SMTP server (aiosmtpd's mail.log) and HTTP client log here too.
    check_log_lines([r for r in records if r["logger"] not in TEST_LOGGERS], event, secrets)


# -- the real service (subprocess, real broker, real SMTP server) --------------------------


@pytest.fixture
async def running_service(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> AsyncIterator[ServiceProcess]:
    proc = ServiceProcess(
        service_env(
            tmp_path,
            bootstrap=kafka_bootstrap,
            topic=topic,
            smtp_port=smtp_server.port,
            smtp_timeout_seconds=3,
        ),
        free_port(),
        log_path=tmp_path / "service.log",
    )
    await asyncio.to_thread(proc.start, 60)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop, 30)


@pytest.mark.integration
async def test_readyz_follows_smtp_on_the_real_service(
    running_service: ServiceProcess, smtp_server: SmtpRecorder
) -> None:
    # /healthz answers as soon as HTTP is up; the broker connects just after: poll.
    response = await poll(
        lambda: (r := running_service.get("/readyz")).status_code == 200 and r, 30, "ready"
    )
    assert response.text.strip() == "ready"
    assert (await asyncio.to_thread(running_service.get, "/healthz")).status_code == 200

    smtp_server.stop()
    try:
        response = await asyncio.to_thread(running_service.get, "/readyz")
        assert response.status_code == 503
        assert response.text.strip() == "smtp unreachable"
        # Alive is not ready: the process itself is fine.
        assert (await asyncio.to_thread(running_service.get, "/healthz")).status_code == 200
    finally:
        smtp_server.start()
    response = await asyncio.to_thread(running_service.get, "/readyz")
    assert response.status_code == 200


@pytest.mark.integration
async def test_real_service_logs_json_lines_with_ids_and_never_texts(
    running_service: ServiceProcess, smtp_server: SmtpRecorder, kafka_bootstrap: str, topic: str
) -> None:
    event, secrets = secret_event()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, json.dumps(event).encode(), key=b"1042")
    finally:
        await producer.stop()
    await smtp_server.wait_for(3, timeout=30)

    def sent_lines() -> bool:
        records = running_service.log_records()
        return sum(r.get("event_id") == event["id"] for r in records) >= 3

    await poll(sent_lines, 10, "the 'sent' log lines", interval=0.2, blocking=True)
    await asyncio.to_thread(running_service.stop, 30)

    output = running_service.log_text()
    not_json = [line for line in output.splitlines() if line and not line.startswith("{")]
    assert not_json == [], "lines that are not JSON objects:\n" + "\n".join(not_json[:10])
    check_log_lines(running_service.log_records(), event, secrets)
