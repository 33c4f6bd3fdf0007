"""Settings in, values out: what start-up builds before anything connects."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from service.core.directory import Directory, DirectoryError, load_directory
from service.core.render import Renderer, RenderError
from service.core.routing import RoutingPolicy
from service.delivery.build import InlineBuilder, MailBuilder, MailFactory, MailSpec
from service.delivery.config import DeliveryConfig
from service.delivery.ledger import LedgerConfig
from service.delivery.reminding import ReminderConfig
from service.delivery.smtp import SmtpConfig
from service.delivery.workers import PooledBuilder, WorkerPool
from service.runtime.metrics import Metrics
from service.runtime.settings import Settings, SettingsError


@dataclass
class Parts:
    """What start-up builds before anything connects; a failure here is a bad setting."""

    settings: Settings
    directory: Directory
    factory: MailFactory
    spec: MailSpec
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
    spec = mail_spec(settings)
    registry = CollectorRegistry()
    factory = MailFactory(renderer, spec.store(), spec)
    return Parts(settings, directory, factory, spec, registry, Metrics(registry))


def mail_builder(parts: Parts) -> MailBuilder:
    """Worker processes when NOTIFY_RENDER_WORKERS > 0, else this process."""
    inline = InlineBuilder(parts.factory)
    workers = parts.settings.render_workers
    return PooledBuilder(WorkerPool(parts.spec, workers), inline) if workers else inline


def mail_spec(settings: Settings) -> MailSpec:
    return MailSpec(
        templates_dir=settings.templates_dir,
        attachments_dir=settings.attachments_dir,
        max_attachment_bytes=settings.max_attachment_bytes,
        max_mail_bytes=settings.max_mail_bytes,
        sender=settings.mail_from,
        reply_to=settings.reply_to,
        domain=settings.mail_domain,
        zone=settings.timezone,
    )


def ledger_config(settings: Settings) -> LedgerConfig:
    return LedgerConfig(
        migrate=settings.ledger_migrate,
        sqlite_synchronous=settings.ledger_sqlite_synchronous,
        pool_size=settings.ledger_pool_size,
    )


def reminder_config(settings: Settings) -> ReminderConfig:
    return ReminderConfig(
        zone=settings.timezone,
        default_time=settings.reminder_default_time,
        max_late=settings.reminder_max_late,
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
        owner=instance_name(),
        lease_seconds=settings.claim_lease_seconds,
        recipient_limit=settings.recipient_limit_per_hour,
        group_id=settings.group_id,
        history_grace=settings.history_grace_minutes * 60,
        max_event_age=(
            settings.max_event_age_hours * 3600 if settings.max_event_age_hours else None
        ),
    )


def instance_name() -> str:
    """This process among the group's instances, as its claims in the ledger name it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
        pipelining=settings.smtp_pipelining,
    )
