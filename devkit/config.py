"""Settings of a service under test or benchmark: one builder, as Settings or as NOTIFY_* env."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devkit import EXAMPLES
from devkit.process import free_port
from service.runtime.settings import Settings, load_settings

TEST_TIMINGS: Mapping[str, Any] = {
    "smtp_timeout_seconds": 5,
    "retry_initial_seconds": 0.05,
    "retry_max_seconds": 0.5,
    "retry_budget_seconds": 10.0,
    "session_timeout_ms": 6000,
    # A killed instance's claims hold its unfinished mails this long (twice the SMTP timeout).
    "claim_lease_seconds": 10,
}
"""Short timeouts and retries, so that tests of failures do not wait for production values."""


def service_values(
    work: Path,
    *,
    bootstrap: str,
    topic: str,
    smtp_port: int,
    timings: Mapping[str, Any] = TEST_TIMINGS,
    **overrides: Any,
) -> dict[str, Any]:
    """Settings (by field name) for a service on loopback: the example directory and
    attachments, a ledger in `work`, `timings` (test timings by default; `{}` keeps the
    production defaults), then `overrides` (None: unset). The one set every test, the
    fault suite and the benchmark start from."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "topic": topic,
        "dlq_topic": f"{topic}.dlq",
        "group_id": f"{topic}-notifier",
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "mail_from": "Helpdesk <helpdesk@helpdesk.test>",
        "reply_to": "support@helpdesk.test",
        "directory_file": EXAMPLES / "directory.yaml",
        "attachments_dir": EXAMPLES / "attachments",
        "ledger_url": f"sqlite:///{work / 'ledger.sqlite3'}",
        "http_port": free_port(),
        "log_level": "INFO",
        # Tests and the fault suite mail the same few addresses over and over: no hourly
        # limit (section 10), explicitly; the limit's own tests set one.
        "recipient_limit_per_hour": 0,
        **timings,
    }
    values.update(overrides)
    return values


def service_settings(
    work: Path, *, bootstrap: str, topic: str, smtp_port: int, **overrides: Any
) -> Settings:
    """The same, as a Settings object for an in-process service (devkit.inprocess)."""
    return load_settings(
        **service_values(work, bootstrap=bootstrap, topic=topic, smtp_port=smtp_port, **overrides)
    )


def service_env(
    work: Path, *, bootstrap: str, topic: str, smtp_port: int, **overrides: Any
) -> dict[str, str]:
    """The same, as NOTIFY_* variables for a `notifier run` child process (None: unset)."""
    values = service_values(
        work, bootstrap=bootstrap, topic=topic, smtp_port=smtp_port, **overrides
    )
    return {f"NOTIFY_{k.upper()}": str(v) for k, v in values.items() if v is not None}
