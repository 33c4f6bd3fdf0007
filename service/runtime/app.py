"""Wiring: settings → parts → a FastStream Kafka subscriber served beside health and metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CollectorRegistry, make_asgi_app

from service.core.directory import Directory, DirectoryError, load_directory
from service.core.render import Renderer, RenderError
from service.core.routing import RoutingPolicy
from service.delivery.attachments import DirectoryAttachmentStore
from service.delivery.dispatch import DeliveryConfig, Dispatcher, Record, RetryLater
from service.delivery.ledger import (
    LedgerConfig,
    LedgerUnavailable,
    create_ledger,
    open_when_reachable,
)
from service.delivery.prepare import PreparePool, Preparer, PreparerSpec
from service.delivery.smtp import SmtpConfig, SmtpPool
from service.runtime.metrics import Metrics
from service.runtime.settings import Settings, SettingsError

log = logging.getLogger("service.runtime.app")

LAG_INTERVAL_SECONDS = 10.0
REWIND_PAUSE_SECONDS = 1.0
# A dead letter keeps at most this much of an oversized value (the original stays
# readable on the main topic at x-original-offset while retention lasts).
DLQ_TRUNCATED_BYTES = 64 * 1024


class KafkaDeadLetters:
    """Publishes dead letters with the original key, value and headers plus the reason."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        # aiokafka binds a producer to the running loop, so it is made here, not earlier.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap_servers, acks="all", enable_idempotence=True
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def send(self, record: Record, stage: str, reason: str) -> None:
        if self._producer is None:
            raise RuntimeError("dead-letter producer not started")
        headers = [
            *((k, v) for k, v in record.headers if not k.startswith("x-error-")),
            ("x-error-stage", stage.encode()),
            ("x-error-reason", _one_line(reason).encode()),
            ("x-original-topic", record.topic.encode()),
            ("x-original-partition", str(record.partition).encode()),
            ("x-original-offset", str(record.offset).encode()),
        ]
        try:
            try:
                await self._producer.send_and_wait(
                    self._topic, value=record.value, key=record.key, headers=headers
                )
            except MessageSizeTooLargeError:
                # Our headers pushed a value near the size limit over it: the reason and
                # the coordinates matter more than the bytes, which the main topic keeps.
                size = len(record.value or b"")
                await self._producer.send_and_wait(
                    self._topic,
                    value=(record.value or b"")[:DLQ_TRUNCATED_BYTES],
                    key=record.key,
                    headers=[*headers, ("x-error-truncated", str(size).encode())],
                )
        except KafkaError as exc:
            # The record cannot be committed before its dead letter is stored: retry later.
            log.warning("dead letter not stored", extra={"error": type(exc).__name__})
            raise RetryLater from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def record_of(raw: ConsumerRecord[Any, Any]) -> Record:
    return Record(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=raw.key,
        value=raw.value,
        headers=tuple((k, v if isinstance(v, bytes) else b"") for k, v in raw.headers),
        timestamp_ms=raw.timestamp,
    )


@dataclass
class Parts:
    """What start-up builds before anything connects; a failure here is a bad setting."""

    settings: Settings
    directory: Directory
    renderer: Renderer
    store: DirectoryAttachmentStore
    spec: PreparerSpec
    registry: CollectorRegistry
    metrics: Metrics


def build_parts(settings: Settings) -> Parts:
    """Load the directory and templates; raise SettingsError naming the setting at fault."""
    try:
        directory = (
            load_directory(settings.directory_file)
            if settings.directory_file is not None
            else Directory.empty()
        )
    except DirectoryError as exc:
        raise SettingsError(f"NOTIFY_DIRECTORY_FILE: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"NOTIFY_DIRECTORY_FILE: {exc.strerror}: {exc.filename}") from None
    if not settings.templates_dir.is_dir():
        raise SettingsError(f"NOTIFY_TEMPLATES_DIR: not a folder: {settings.templates_dir}")
    try:
        renderer = Renderer(settings.templates_dir)
        renderer.check()
    except RenderError as exc:
        raise SettingsError(f"NOTIFY_TEMPLATES_DIR: {exc}") from None
    if not settings.attachments_dir.is_dir():
        raise SettingsError(f"NOTIFY_ATTACHMENTS_DIR: not a folder: {settings.attachments_dir}")
    spec = preparer_spec(settings)
    registry = CollectorRegistry()
    return Parts(settings, directory, renderer, spec.store(), spec, registry, Metrics(registry))


def preparer_spec(settings: Settings) -> PreparerSpec:
    return PreparerSpec(
        templates_dir=settings.templates_dir,
        attachments_dir=settings.attachments_dir,
        max_attachment_bytes=settings.max_attachment_bytes,
        max_mail_bytes=settings.max_mail_bytes,
        sender=settings.mail_from,
        reply_to=settings.reply_to,
        domain=settings.mail_domain,
    )


def ledger_config(settings: Settings) -> LedgerConfig:
    return LedgerConfig(
        migrate=settings.ledger_migrate,
        sqlite_synchronous=settings.ledger_sqlite_synchronous,
        pool_size=settings.ledger_pool_size,
    )


def routing_policy(settings: Settings) -> RoutingPolicy:
    return RoutingPolicy(
        suppliers_may_receive_personal_data=settings.suppliers_may_receive_personal_data
    )


def delivery_config(settings: Settings) -> DeliveryConfig:
    return DeliveryConfig(
        envelope_from=settings.envelope_from,
        domain=settings.mail_domain,
        policy=routing_policy(settings),
        concurrency=settings.concurrency,
        retry_initial=settings.retry_initial_seconds,
        retry_max=settings.retry_max_seconds,
        retry_budget=settings.retry_budget_seconds,
        attachment_wait=settings.attachment_wait_seconds,
    )


def smtp_config(settings: Settings) -> SmtpConfig:
    return SmtpConfig(
        host=settings.smtp_host,
        port=settings.smtp_port,
        security=settings.smtp_security,
        ca_file=str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
        username=settings.smtp_username,
        password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
        timeout=settings.smtp_timeout_seconds,
        pool_size=settings.smtp_pool_size,
    )


async def _raw_parser(msg: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    # FastStream decodes every header value as UTF-8 and one binary header would fail
    # the whole batch forever; parse without headers and keep the raw records instead.
    records = tuple(msg)
    stripped = tuple(
        ConsumerRecord(
            r.topic,
            r.partition,
            r.offset,
            r.timestamp,
            r.timestamp_type,
            r.key,
            r.value,
            r.checksum,
            r.serialized_key_size,
            r.serialized_value_size,
            [],
        )
        for r in records
    )
    parsed = await original(stripped)
    parsed.raw_message = records
    return parsed


async def _no_decoder(msg: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    # Bodies are parsed by service.core.events, which turns bad input into dead letters.
    return None


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
    dead_letters = KafkaDeadLetters(settings.kafka_bootstrap_servers, settings.dlq_topic)
    workers = PreparePool(parts.spec, settings.render_workers) if settings.render_workers else None
    dispatcher = Dispatcher(
        config=delivery_config(settings),
        directory=parts.directory,
        preparer=Preparer(parts.renderer, parts.store, parts.spec),
        ledger=ledger,
        mailer=pool,
        dead_letters=dead_letters,
        metrics=metrics,
        pool=workers,
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
        parser=_raw_parser,
        decoder=_no_decoder,
        title="ticket-activities",
        description="Ticket activity CloudEvents; see docs/asyncapi.yaml for the schema.",
    )

    @subscriber
    async def handle(message: KafkaMessage) -> None:
        records = [record_of(raw) for raw in message.raw_message]
        try:
            await dispatcher.handle_batch(records)
        except (RetryLater, LedgerUnavailable):
            # Rewind every partition of the batch; the ledger keeps what was sent.
            metrics.rewind("retry_later")
            await message.nack()
            return
        except Exception as exc:
            # Anything unforeseen must not let the next commit pass these records by:
            # rewind too, and pause so a persistent fault does not spin.
            metrics.rewind("error")
            log.error(
                "batch failed, rewinding",
                extra={"error": type(exc).__name__, "records": len(records)},
            )
            await message.nack()
            await asyncio.sleep(REWIND_PAUSE_SECONDS)
            return
        await message.ack()

    tasks: list[asyncio.Task[None]] = []

    async def report_lag() -> None:
        while True:
            await asyncio.sleep(LAG_INTERVAL_SECONDS)
            consumer = getattr(subscriber, "consumer", None)
            if isinstance(consumer, AIOKafkaConsumer):
                try:
                    await _measure_lag(consumer, metrics)
                except Exception as exc:  # the next round tries again
                    log.warning("consumer lag not measured", extra={"error": type(exc).__name__})

    async def start() -> None:
        if workers is not None:
            await workers.start()
        # Waits while the database is unreachable; a bad URL, password or schema stops here.
        await open_when_reachable(ledger)
        await dead_letters.start()
        tasks.append(asyncio.create_task(report_lag()))

    async def stop_consuming() -> None:
        dispatcher.stop()

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await dead_letters.stop()
        await pool.close()
        await ledger.close()
        if workers is not None:
            workers.close()

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
        if reasons:
            return AsgiResponse(("; ".join(reasons) + "\n").encode(), 503)
        return AsgiResponse(b"ready\n", 200)

    return AsgiFastStream(
        broker,
        asgi_routes=[
            ("/healthz", healthz),
            ("/readyz", readyz),
            ("/metrics", make_asgi_app(registry)),
        ],
        logger=logging.getLogger("service.runtime.app"),
        on_startup=[start],
        on_shutdown=[stop_consuming],
        after_shutdown=[stop],
    )


async def _measure_lag(consumer: AIOKafkaConsumer, metrics: Metrics) -> None:
    partitions: set[TopicPartition] = consumer.assignment()
    if not partitions:
        metrics.lags({})
        return
    ends = await consumer.end_offsets(list(partitions))
    starts = await consumer.beginning_offsets(list(partitions))
    behind = {}
    for tp in partitions:
        # Nothing committed yet: count from the oldest record retention has kept.
        committed = await consumer.committed(tp)
        behind[tp.partition] = max(0, ends[tp] - (starts[tp] if committed is None else committed))
    metrics.lags(behind)
