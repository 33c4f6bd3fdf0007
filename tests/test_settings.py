"""Settings: defaults from the contract, and one clear line for a bad value."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from service.runtime.settings import Settings, SettingsError, load_settings


def test_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("NOTIFY_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "localhost:9092"
    assert settings.topic == "ticket-activities"
    assert settings.dlq_topic == "ticket-activities.dlq"
    assert settings.group_id == "ticket-notifier"
    assert settings.http_port == 8000
    assert settings.smtp_security == "none"
    assert settings.suppliers_may_receive_personal_data is False


def test_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SMTP_PORT", "2525")
    monkeypatch.setenv("NOTIFY_SMTP_SECURITY", "starttls")
    monkeypatch.setenv("NOTIFY_SUPPLIERS_MAY_RECEIVE_PERSONAL_DATA", "true")
    monkeypatch.setenv("NOTIFY_MAIL_FROM", "Support <support@example.test>")
    settings = load_settings()
    assert settings.smtp_port == 2525
    assert settings.smtp_security == "starttls"
    assert settings.suppliers_may_receive_personal_data is True
    assert settings.envelope_from == "support@example.test"
    assert settings.mail_domain == "example.test"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NOTIFY_SMTP_PORT", "not-a-port"),
        ("NOTIFY_SMTP_PORT", "70000"),
        ("NOTIFY_SMTP_SECURITY", "ssl3"),
        ("NOTIFY_MAIL_FROM", "nobody"),
        ("NOTIFY_HTTP_PORT", "-1"),
        ("NOTIFY_SUPPLIERS_MAY_RECEIVE_PERSONAL_DATA", "perhaps"),
    ],
)
def test_bad_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{name}:")
    assert "\n" not in message


def test_message_id_domain_must_be_a_host_name() -> None:
    with pytest.raises(SettingsError, match="NOTIFY_MESSAGE_ID_DOMAIN: not a host name"):
        load_settings(message_id_domain="x>@evil")
    assert load_settings(message_id_domain="mail.helpdesk.test").mail_domain == (
        "mail.helpdesk.test"
    )


def test_mail_from_cannot_carry_newlines() -> None:
    with pytest.raises(SettingsError, match="NOTIFY_MAIL_FROM"):
        load_settings(mail_from="a@b.test\r\nBcc: x@y.test")


def test_retry_budget_must_fit_the_poll_interval() -> None:
    with pytest.raises(SettingsError, match="NOTIFY_RETRY_BUDGET_SECONDS"):
        load_settings(retry_budget_seconds=290, max_poll_interval_ms=300_000)


def test_ledger_url_scheme_is_checked() -> None:
    with pytest.raises(SettingsError, match="NOTIFY_LEDGER_URL: unknown scheme 'mysql'"):
        load_settings(ledger_url="mysql://db/ledger")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///var/ledger.sqlite3",
        "memory://",
        "postgresql://notifier:s3cret@db.internal:5432/ledger",
        "postgres://notifier:s3cret@db.internal/ledger?sslmode=require",
    ],
)
def test_ledger_url_forms(url: str) -> None:
    settings = load_settings(ledger_url=url)
    assert settings.ledger_url.get_secret_value() == url
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("postgresql://notifier:s3cret@db:54x2/ledger", "malformed PostgreSQL URL"),
        ("postgresql://notifier:s3cret@db/ledger?nonsense=1", "unknown connection option"),
        ("postgresql://notifier:s3cret@db/led/ger", "database name"),
        ("sqlite://relative.db", "three slashes"),
    ],
)
def test_a_bad_ledger_url_is_one_line_without_the_password(url: str, why: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(ledger_url=url)
    message = str(caught.value)
    assert message.startswith("NOTIFY_LEDGER_URL: ")
    assert why in message
    assert "\n" not in message
    assert "s3cret" not in message


def test_ledger_defaults_favour_durability(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MIGRATE", "RETENTION_DAYS", "SQLITE_SYNCHRONOUS"):
        monkeypatch.delenv(f"NOTIFY_LEDGER_{name}", raising=False)
    settings = load_settings()
    assert settings.ledger_sqlite_synchronous == "full"
    assert settings.ledger_migrate is True
    assert settings.ledger_retention_days == 30
    assert load_settings(ledger_sqlite_synchronous="NORMAL").ledger_sqlite_synchronous == "normal"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(Exception):
        settings.topic = "other"  # type: ignore[misc]


def test_reminder_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "NOTIFY_TIMEZONE",
        "NOTIFY_REMINDER_DEFAULT_TIME",
        "NOTIFY_REMINDER_MAX_LATE_HOURS",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.timezone == ZoneInfo("UTC")
    assert settings.reminder_default_time == dt.time(9, 0)
    assert settings.reminder_max_late == dt.timedelta(hours=24)


def test_reminder_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_TIMEZONE", " Europe/Berlin ")
    monkeypatch.setenv("NOTIFY_REMINDER_DEFAULT_TIME", "07:30")
    monkeypatch.setenv("NOTIFY_REMINDER_MAX_LATE_HOURS", "0.5")
    settings = load_settings()
    assert settings.timezone == ZoneInfo("Europe/Berlin")
    assert settings.reminder_default_time == dt.time(7, 30)
    assert settings.reminder_max_late == dt.timedelta(minutes=30)
    assert load_settings(reminder_max_late_hours=0).reminder_max_late == dt.timedelta(0)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("NOTIFY_TIMEZONE", "Mars/Olympus_Mons", "not an IANA time zone"),
        ("NOTIFY_TIMEZONE", "Europe", "not an IANA time zone"),
        ("NOTIFY_TIMEZONE", "../../etc/passwd", "not an IANA time zone"),
        ("NOTIFY_TIMEZONE", "localtime", "not an IANA time zone"),
        ("NOTIFY_TIMEZONE", "", "not an IANA time zone"),
        ("NOTIFY_REMINDER_DEFAULT_TIME", "25:00", "not a time of day"),
        ("NOTIFY_REMINDER_DEFAULT_TIME", "9am", "not a time of day"),
        ("NOTIFY_REMINDER_DEFAULT_TIME", "", "not a time of day"),
        ("NOTIFY_REMINDER_MAX_LATE_HOURS", "-1", "greater than or equal to 0"),
        ("NOTIFY_REMINDER_MAX_LATE_HOURS", "a day", "valid number"),
    ],
)
def test_bad_reminder_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert says in message
    assert "\n" not in message
