"""Settings from NOTIFY_* environment variables, validated once at start-up."""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from email.utils import parseaddr
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.fields import parse_time
from service.delivery.ledger.errors import LedgerConfigError
from service.delivery.ledger.url import parse_ledger_url

ENV_PREFIX = "NOTIFY_"
S = TypeVar("S", bound=BaseSettings)


def default_templates_dir() -> Path:
    """The templates shipped with the package, else the repository's `templates/`."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "templates"
    return packaged if packaged.is_dir() else package.parent / "templates"


def default_render_workers() -> int:
    """One process per CPU beside the event loop's, at least 2 and at most 4; none on a
    single CPU. Two on two CPUs: a batch's chunks are built side by side, which at
    moderate load halves the wait for its last mails (benchmarks/README.md)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    return 0 if cpus < 2 else min(4, max(2, cpus - 1))


class Settings(BaseSettings):
    """Every setting of the service; the field name upper-cased with NOTIFY_ is the variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Kafka
    kafka_bootstrap_servers: str = "localhost:9092"
    topic: str = "ticket-activities"
    dlq_topic: str = "ticket-activities.dlq"
    group_id: str = "ticket-notifier"
    batch_max_records: int = Field(default=500, ge=1, le=10_000)
    batch_timeout_ms: int = Field(default=20, ge=1, le=10_000)
    # Finished batches' offsets are committed at most this often (0: after every batch).
    commit_interval_ms: int = Field(default=100, ge=0, le=10_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    graceful_timeout_seconds: float = Field(default=20.0, gt=0)

    # SMTP
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    smtp_ca_file: Path | None = None
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    smtp_pool_size: int = Field(default=8, ge=1, le=256)
    # false: plain aiosmtplib transactions instead of the pipelined fast path (a safety valve).
    smtp_pipelining: bool = True

    # Mail
    mail_from: str = "Helpdesk <helpdesk@localhost>"
    reply_to: str | None = None
    message_id_domain: str | None = None

    # Files
    directory_file: Path | None = None
    attachments_dir: Path = Path("attachments")
    templates_dir: Path = Field(default_factory=default_templates_dir)
    # Secret: a PostgreSQL URL carries the password (see service.delivery.ledger.url).
    ledger_url: SecretStr = SecretStr("sqlite:///var/ledger.sqlite3")
    ledger_migrate: bool = True
    ledger_retention_days: float = Field(default=30.0, gt=0)
    ledger_pool_size: int = Field(default=10, ge=1, le=100)
    ledger_sqlite_synchronous: Literal["full", "normal"] = "full"
    max_attachment_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_mail_bytes: int = Field(default=25 * 1024 * 1024, ge=1)
    attachment_wait_seconds: float = Field(default=300.0, ge=0)

    # Policy and delivery
    suppliers_may_receive_personal_data: bool = False
    concurrency: int = Field(default=64, ge=1, le=4096)
    render_workers: int = Field(default_factory=default_render_workers, ge=0, le=64)
    retry_initial_seconds: float = Field(default=0.5, gt=0)
    retry_max_seconds: float = Field(default=30.0, gt=0)
    retry_budget_seconds: float = Field(default=120.0, gt=0)

    # Several instances (contract section 7): how long a claim on a notification lasts
    claim_lease_seconds: float = Field(default=60.0, ge=5)

    # Safety (contract section 10)
    history_grace_minutes: float = Field(default=60.0, ge=0)
    max_event_age_hours: float | None = Field(default=None, gt=0)
    recipient_limit_per_hour: int = Field(default=30, ge=0)

    # Reminders (contract section 9)
    timezone: ZoneInfo = ZoneInfo("UTC")  # IANA zone of times that carry none
    reminder_default_time: dt.time = dt.time(9, 0)  # the time of a date without one
    reminder_max_late_hours: float = Field(default=24.0, ge=0)

    # Operations
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    # The delivery audit (GET /deliveries, /ui/) holds addresses: off (404) while unset.
    http_token: SecretStr | None = None
    watch_interval_seconds: float = Field(default=10.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # uvloop (libuv) or the standard library's selector loop; benchmarks/README.md.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @field_validator("mail_from", "reply_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(ch in value for ch in "\r\n\0"):
            raise ValueError("must be one line")
        _, address = parseaddr(value)
        if "@" not in address:
            raise ValueError(f"not an e-mail address: {value!r}")
        return value

    @field_validator("message_id_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        # Message-IDs are minted under it (RFC 5322 §3.6.4 id-right): a plain host name.
        if value is not None and not re.fullmatch(
            r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
            r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
            value,
        ):
            raise ValueError(f"not a host name: {value!r}")
        return value

    @field_validator("ledger_url")
    @classmethod
    def _ledger_url(cls, value: SecretStr) -> SecretStr:
        try:
            parse_ledger_url(value.get_secret_value())
        except LedgerConfigError as exc:
            # The message names the part at fault, never the password.
            raise ValueError(str(exc).removeprefix("NOTIFY_LEDGER_URL: ")) from None
        return value

    @field_validator("http_token")
    @classmethod
    def _http_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None  # NOTIFY_HTTP_TOKEN= (empty) leaves the audit off, as unset does
        # It travels in an Authorization header and a cookie: visible ASCII, one word.
        if not all("!" <= ch <= "~" for ch in value.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces")
        return value

    @field_validator("ledger_sqlite_synchronous", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("timezone", mode="before")
    @classmethod
    def _zone(cls, value: object) -> object:
        if isinstance(value, ZoneInfo):
            return value
        text = str(value).strip()
        # "localtime" and "posixrules" are files beside the zones, not IANA names.
        if text not in {"localtime", "posixrules"}:
            try:
                return ZoneInfo(text)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                pass
        raise ValueError(f"not an IANA time zone (e.g. Europe/Berlin): {text[:40]!r}")

    @field_validator("reminder_default_time", mode="before")
    @classmethod
    def _time_of_day(cls, value: object) -> object:
        at = parse_time(value) if isinstance(value, str | dt.time) else None
        if at is None:
            raise ValueError(f"not a time of day (HH:MM): {str(value)[:40]!r}")
        return at

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _timeouts_fit_together(self) -> Settings:
        # A send is checked against its claim's lease at its end, renewed at half time.
        if self.claim_lease_seconds < 2 * self.smtp_timeout_seconds:
            raise ValueError(
                "NOTIFY_CLAIM_LEASE_SECONDS must be at least twice NOTIFY_SMTP_TIMEOUT_SECONDS"
            )
        # The batch handler retries in process; it must hand control back to the poll
        # loop well before max.poll.interval.ms or the group evicts the consumer.
        if self.retry_budget_seconds * 1000 >= self.max_poll_interval_ms * 0.8:
            raise ValueError(
                "NOTIFY_RETRY_BUDGET_SECONDS must stay below 80% of NOTIFY_MAX_POLL_INTERVAL_MS"
            )
        return self

    @property
    def reminder_max_late(self) -> dt.timedelta:
        """NOTIFY_REMINDER_MAX_LATE_HOURS as a duration."""
        return dt.timedelta(hours=self.reminder_max_late_hours)

    @property
    def envelope_from(self) -> str:
        """The bare address of NOTIFY_MAIL_FROM, for the SMTP envelope."""
        return parseaddr(self.mail_from)[1]

    @property
    def mail_domain(self) -> str:
        """The domain under which Message-IDs are minted."""
        return self.message_id_domain or self.envelope_from.rpartition("@")[2] or "localhost"


class SettingsError(Exception):
    """A setting is invalid; the message is one line naming it."""


def read_settings(cls: type[S], prefix: str, **overrides: Any) -> S:
    """Build a settings model, turning pydantic's report into one line naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        message = "not set" if error["type"] == "missing" else str(error["msg"])
        message = message.removeprefix("Value error, ")
        if loc:
            raise SettingsError(f"{prefix}{loc[0].upper()}: {message}") from None
        raise SettingsError(message) from None


def load_settings(**overrides: Any) -> Settings:
    """The service's settings (NOTIFY_*); SettingsError with one line if one is bad."""
    return read_settings(Settings, ENV_PREFIX, **overrides)


def settings_or_exit() -> Settings:
    """For the command line: the settings, or the bad one named on stderr and exit 2."""
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
