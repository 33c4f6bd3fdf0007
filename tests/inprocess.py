"""Run the service in this process (uvicorn + FastStream) for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from aiokafka import AIOKafkaProducer

from devkit.devstack import free_port
from service.runtime.app import create_app
from service.runtime.settings import Settings, load_settings

EXAMPLES = Path(__file__).parent.parent / "examples"


def service_values(
    tmp_path: Path, *, bootstrap: str, topic: str, smtp_port: int, **overrides: Any
) -> dict[str, Any]:
    """Settings (by field name) for a test service on loopback with the example directory
    and attachments, a ledger in `tmp_path` and short retries; the one set every test
    that runs the service starts from."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "topic": topic,
        "dlq_topic": f"{topic}.dlq",
        "group_id": f"{topic}-notifier",
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "smtp_timeout_seconds": 5,
        "mail_from": "Helpdesk <helpdesk@helpdesk.test>",
        "reply_to": "support@helpdesk.test",
        "directory_file": EXAMPLES / "directory.yaml",
        "attachments_dir": EXAMPLES / "attachments",
        "ledger_url": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        "http_port": free_port(),
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 0.5,
        "retry_budget_seconds": 10.0,
        "session_timeout_ms": 6000,
        "log_level": "INFO",
        # These tests mail the same few addresses over and over: no hourly limit (it has
        # tests of its own, which set it).
        "recipient_limit_per_hour": 0,
    }
    values.update(overrides)
    return values


def service_settings(
    tmp_path: Path, *, bootstrap: str, topic: str, smtp_port: int, **overrides: Any
) -> Settings:
    """The same, as a Settings object for `running_service`."""
    return load_settings(
        **service_values(
            tmp_path, bootstrap=bootstrap, topic=topic, smtp_port=smtp_port, **overrides
        )
    )


def service_env(
    tmp_path: Path, *, bootstrap: str, topic: str, smtp_port: int, **overrides: Any
) -> dict[str, str]:
    """The same, as NOTIFY_* variables for a `notifier run` child process (None: unset)."""
    values = service_values(
        tmp_path, bootstrap=bootstrap, topic=topic, smtp_port=smtp_port, **overrides
    )
    return {f"NOTIFY_{k.upper()}": str(v) for k, v in values.items() if v is not None}


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[str]:
    """Serve the app until the block ends; yields its base URL once /healthz answers."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=settings.http_port, lifespan="on", log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if task.done():
                    task.result()
                    raise RuntimeError("service stopped during start-up")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{base}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError("service did not answer /healthz")
        yield base
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


async def publish(
    bootstrap: str, topic: str, events: list[Mapping[str, Any] | bytes], key: bytes | None = None
) -> None:
    """Publish CloudEvents (structured mode) keyed by their ticket id, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for event in events:
            if isinstance(event, bytes):
                await producer.send_and_wait(topic, value=event, key=key)
                continue
            ticket = str(event["data"]["activity"]["ticketID"]).encode()
            await producer.send_and_wait(
                topic,
                value=json.dumps(event).encode(),
                key=key or ticket,
                headers=[("content-type", b"application/cloudevents+json")],
            )
    finally:
        await producer.stop()


def example_events() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((EXAMPLES / "events").glob("*.json"))]


def example(name: str, **activity: Any) -> dict[str, Any]:
    """An example event with `time` set to now and activity fields overridden."""
    event: dict[str, Any] = json.loads((EXAMPLES / "events" / name).read_text())
    event["time"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    event["data"]["activity"].update(activity)
    return event


def mixed_examples() -> list[dict[str, Any]]:
    """Every kind of mail, one unknown department (unresolved) and one supplier mail with
    personal data (withheld): the example events that exercise every label."""
    return [
        example("01-customer-content.json"),
        example("02-customer-update-directory-ticket.json"),
        example("03-staff-note.json", activityDepartments="support; no-such-department"),
        example("04-supplier-request.json"),
        example("06-updated.json"),
        example("07-supplier-personal-data.json"),
    ]
