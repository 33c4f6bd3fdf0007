"""The producer commands of `notifier`: `publish FILE|-` and `bridge`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError
from pydantic import ValidationError

from service.core.events import InvalidEvent, Ticket
from service.producer.publisher import (
    InvalidActivity,
    Outgoing,
    Publisher,
    build_event,
    encode_event,
)
from service.runtime.settings import Settings, SettingsError, read_settings, settings_or_exit

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from service.producer.bridge import BridgeSettings

log = logging.getLogger("service.producer.bridge")

MAX_REPORTED = 20  # bad items listed before "and N more"


class InputError(Exception):
    """The input file cannot be read as JSON items; the message says where."""


def add_producer_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `publish` and `bridge` on the `notifier` command's subparsers."""
    pub = subparsers.add_parser("publish", help="publish activities or CloudEvents to Kafka")
    pub.add_argument(
        "file",
        help="JSON: one CloudEvent or activity, an array of them, or JSON lines ('-': stdin)",
    )
    pub.add_argument(
        "--type",
        choices=("created", "updated"),
        default="created",
        help="event type for activities (CloudEvents keep their own)",
    )
    pub.add_argument("--ticket-json", help="a ticket with its customer, sent as data.ticket")
    pub.set_defaults(func=cmd_publish)

    bridge = subparsers.add_parser(
        "bridge", help="poll the backend's activity API and publish new and changed activities"
    )
    bridge.set_defaults(func=cmd_bridge)


def read_items(text: str) -> list[Any]:
    """A JSON document (an array is its items, anything else one item), else JSON lines."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"line {number}: not JSON ({exc.msg})") from None
        return items
    return document if isinstance(document, list) else [document]


def prepare(items: list[Any], kind: str, ticket: Ticket | None) -> tuple[list[Outgoing], list[str]]:
    """Encode every item, or say what is wrong with each bad one (by item number and field)."""
    outgoing: list[Outgoing] = []
    errors: list[str] = []
    for number, item in enumerate(items, start=1):
        try:
            if not isinstance(item, Mapping):
                raise InvalidActivity("item", "not a JSON object")
            if "specversion" in item:
                outgoing.append(encode_event(item))
            else:
                outgoing.append(build_event(item, type=kind, ticket=ticket))
        except InvalidActivity as exc:
            errors.append(f"item {number}: {exc.field}: {exc.reason}")
        except InvalidEvent as exc:
            errors.append(f"item {number}: {exc.stage}: {exc.reason}")
    return outgoing, errors


def load_ticket(path: Path) -> Ticket:
    try:
        return Ticket.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "ticket"
        raise InputError(f"{path}: {where}: {error['msg']}") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None


def cmd_publish(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    try:
        ticket = load_ticket(Path(args.ticket_json)) if args.ticket_json else None
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
        items = read_items(text)
    except (InputError, OSError, UnicodeDecodeError) as exc:
        message = exc.strerror if isinstance(exc, OSError) else str(exc)
        print(f"notifier publish: {message}", file=sys.stderr)
        return 1
    # Everything is validated before anything is sent: a bad item sends nothing at all.
    outgoing, errors = prepare(items, args.type, ticket)
    if errors:
        for line in errors[:MAX_REPORTED]:
            print(f"notifier publish: {line}", file=sys.stderr)
        if len(errors) > MAX_REPORTED:
            print(f"notifier publish: and {len(errors) - MAX_REPORTED} more", file=sys.stderr)
        print("notifier publish: nothing sent", file=sys.stderr)
        return 1
    try:
        published = asyncio.run(_send(settings, outgoing))
    except KafkaError as exc:
        print(f"notifier publish: kafka: {type(exc).__name__}", file=sys.stderr)
        return 1
    for record in published:
        print(f"{record.topic} {record.partition} {record.offset}")
    return 0


async def _send(settings: Settings, outgoing: list[Outgoing]) -> list[Any]:
    async with Publisher(settings.kafka_bootstrap_servers, settings.topic) as publisher:
        return await publisher.send(outgoing)


def cmd_bridge(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from service.producer.cursor import CursorError
    from service.runtime.logs import configure_logging

    settings = settings_or_exit()
    try:
        bridge_settings = load_bridge_settings()
    except SettingsError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # httpx logs every request at INFO; the bridge logs what it did with the answers.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    registry = CollectorRegistry()
    if bridge_settings.http_port:
        start_http_server(
            bridge_settings.http_port, addr=bridge_settings.http_host, registry=registry
        )
    main = run_bridge(bridge_settings, settings.kafka_bootstrap_servers, settings.topic, registry)
    try:
        asyncio.run(_until_signal(main))
    except CursorError as exc:
        print(f"notifier: bridge cursor: {exc}", file=sys.stderr)
        return 2
    return 0


async def run_bridge(
    settings: BridgeSettings, bootstrap_servers: str, topic: str, registry: CollectorRegistry
) -> None:
    """Wire the bridge's parts from settings and run it until cancelled."""
    from service.core.backoff import backoff_delay
    from service.producer.backend import BackendClient
    from service.producer.bridge import Bridge, BridgeMetrics
    from service.producer.cursor import CursorFile

    metrics = BridgeMetrics(registry)
    backend = BackendClient(
        settings.backend_url,
        auth_header=settings.auth_header_name,
        auth_value=settings.auth_header_value,
        timeout_seconds=settings.request_timeout_seconds,
    )
    async with backend:
        failures = 0
        while True:  # the broker may still be starting: wait for it rather than exit
            publisher = Publisher(bootstrap_servers, topic, client_id="ticket-notifier-bridge")
            try:
                await publisher.start()
                break
            except KafkaError as exc:
                await publisher.stop()
                failures += 1
                log.warning("kafka not reachable", extra={"error": type(exc).__name__})
                await asyncio.sleep(backoff_delay(failures - 1, 1.0, settings.backoff_max_seconds))
        try:
            store = CursorFile(settings.cursor_file)
            await Bridge(settings, backend, publisher, store, metrics).run()
        finally:
            await publisher.stop()


async def _until_signal(main: Any) -> None:
    """Run `main` until it ends or SIGTERM/SIGINT cancels it (the cursor stays consistent)."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def load_bridge_settings(**overrides: Any) -> BridgeSettings:
    """Read the bridge settings; SettingsError with one line naming the variable if bad."""
    from service.producer.bridge import ENV_PREFIX, BridgeSettings

    return read_settings(BridgeSettings, ENV_PREFIX, **overrides)
