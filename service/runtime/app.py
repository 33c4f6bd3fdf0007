"""Wiring: settings → parts → a FastStream Kafka subscriber served beside health and metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from faststream import AckPolicy
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import make_asgi_app

from service.delivery.dead_letters import KafkaDeadLetters
from service.delivery.dispatch import Dispatcher
from service.delivery.ledger import LedgerUnavailable, create_ledger, open_when_reachable
from service.delivery.scheduler import ReminderScheduler
from service.delivery.smtp import SmtpPool
from service.runtime.audit.api import audit_routes
from service.runtime.consumer import BatchConsumer
from service.runtime.group import GroupWatch
from service.runtime.parts import (
    build_parts,
    delivery_config,
    ledger_config,
    mail_builder,
    reminder_config,
    smtp_config,
)
from service.runtime.settings import Settings

log = logging.getLogger("service.runtime.app")

PRUNE_INTERVAL_SECONDS = 3600.0
# The collector's youngest generation is collected after this many allocations (net of
# frees) instead of Python's 700: a batch keeps thousands of tasks, futures and records
# alive at once, which 700 had collected (and promoted) over and over.
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Before serving (`notifier run`): fewer and shorter garbage collections on the loop.

    What start-up built (modules, the app, its settings and parts) lives as long as the
    process, yet every full collection walked it: `gc.freeze()` takes it out of the
    collector's sight. (Not in `create_app`: tests build many apps in one process.)
    In a 10,000-event drain (30 s) the loop's process spent 2.9 s in 1,043 collections,
    the 7 full ones ~220 ms each; settled, it ran fewer than 20 (benchmarks/README.md).
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def create_app(settings: Settings) -> AsgiFastStream:
    """The service as an ASGI app: Kafka consumer plus /healthz, /readyz and /metrics."""
    parts = build_parts(settings)
    registry, metrics = parts.registry, parts.metrics
    broker = KafkaBroker(
        settings.kafka_bootstrap_servers,
        middlewares=[KafkaPrometheusMiddleware(registry=registry, app_name="notifier")],
        graceful_timeout=settings.graceful_timeout_seconds,
        client_id="ticket-notifier",
        # FastStream's per-message "Received"/"Processed" lines go through our JSON
        # logging, at DEBUG: the dispatcher logs each outcome with its ids at INFO.
        logger=logging.getLogger("service.kafka"),
        log_level=logging.DEBUG,
    )
    pool = SmtpPool(smtp_config(settings), observer=metrics)
    metrics.pool_size.set(settings.smtp_pool_size)
    ledger = create_ledger(settings.ledger_url.get_secret_value(), ledger_config(settings))
    builder = mail_builder(parts)
    dead_letters = KafkaDeadLetters(settings.kafka_bootstrap_servers, settings.dlq_topic)
    delivery = delivery_config(settings)
    dispatcher = Dispatcher(
        config=delivery,
        directory=parts.directory,
        builder=builder,
        ledger=ledger,
        mailer=pool,
        dead_letters=dead_letters,
        metrics=metrics,
        reminders=reminder_config(settings),
    )
    scheduler = ReminderScheduler(
        ledger,
        dispatcher,
        metrics,
        owner=delivery.owner,
        lease_seconds=delivery.lease_seconds,
    )
    consumer = BatchConsumer(
        dispatcher,
        metrics,
        settings.batch_max_records,
        commit_interval=settings.commit_interval_ms / 1000,
    )
    subscriber = broker.subscriber(
        settings.topic,
        group_id=settings.group_id,
        batch=True,
        max_records=settings.batch_max_records,
        # FastStream also sleeps this long after an empty poll: keep it short for latency.
        batch_timeout_ms=settings.batch_timeout_ms,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        max_poll_interval_ms=settings.max_poll_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        listener=consumer.listener,
        title="ticket-activities",
        description="Ticket activity CloudEvents; see docs/asyncapi.yaml for the schema.",
    )
    consumer.attach(subscriber)
    group = GroupWatch(
        settings.kafka_bootstrap_servers,
        settings.group_id,
        shared_ledger=ledger.shared,
        metrics=metrics,
    )

    @subscriber(parser=consumer.parse, decoder=consumer.decode)
    async def handle(message: KafkaMessage) -> None:
        await consumer.handle(message)

    tasks: list[asyncio.Task[None]] = []

    async def watch_group() -> None:
        while True:
            await group.check()
            await consumer.measure_lag()
            await asyncio.sleep(settings.watch_interval_seconds)

    async def prune() -> None:
        # Old rows go in small batches, an hour apart, so pruning never holds the ledger
        # long; every instance may prune (deleting twice is harmless).
        retention = settings.ledger_retention_days * 86400
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
            try:
                removed = await ledger.prune(time.time() - retention)
            except LedgerUnavailable as exc:
                log.warning("ledger not pruned", extra={"error": type(exc).__name__})
                continue
            if removed:
                log.info("ledger pruned", extra={"rows": removed})

    async def start() -> None:
        await builder.start()
        # Waits while the database is unreachable; a bad URL, password or schema stops here.
        await open_when_reachable(ledger)
        await dead_letters.start()
        tasks.append(asyncio.create_task(watch_group()))
        scheduler.start()
        tasks.append(asyncio.create_task(prune()))

    async def stop_consuming() -> None:
        dispatcher.stop()
        await consumer.flush()
        await scheduler.stop(settings.graceful_timeout_seconds)

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await group.close()
        await dead_letters.stop()
        await pool.close()
        await ledger.close()
        builder.close()

    @get
    async def healthz(scope: Any) -> AsgiResponse:
        return AsgiResponse(b"ok\n", 200)

    @get
    async def readyz(scope: Any) -> AsgiResponse:
        reasons = []
        if not await broker.ping(timeout=3.0):
            reasons.append("kafka unreachable")
        if not await pool.ping():
            reasons.append("smtp unreachable")
        if not await ledger.ping():
            reasons.append("ledger unreachable")
        if group.unsafe:
            reasons.append(f"sqlite ledger shared by {group.members} instances of the group")
        if reasons:
            return AsgiResponse(("; ".join(reasons) + "\n").encode(), 503)
        return AsgiResponse(b"ready\n", 200)

    # The delivery audit (GET /deliveries, /ui/) beside them; off while NOTIFY_HTTP_TOKEN is unset.
    token = settings.http_token.get_secret_value() if settings.http_token else None
    return AsgiFastStream(
        broker,
        asgi_routes=[
            ("/healthz", healthz),
            ("/readyz", readyz),
            ("/metrics", make_asgi_app(registry)),
            *audit_routes(ledger, token, metrics),
        ],
        logger=logging.getLogger("service.runtime.app"),
        on_startup=[start],
        on_shutdown=[stop_consuming],
        after_shutdown=[stop],
    )
