"""Shared fixtures: a real Kafka broker for the session, per-test topics, an SMTP recorder.

Also the hypothesis profiles, chosen by HYPOTHESIS_PROFILE: `quick` (default: the unit tier
in well under a minute), `ci` (what .ci/run uses: more examples per property) and
`thorough` (on demand, e.g. before a release). No deadline in any of them: how fast a test
runs on a shared machine is not what a property asserts (speed belongs in benchmarks/).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from devkit.kafka import KafkaNode
from devkit.postgres import PostgresCluster, create_database, drop_database
from devkit.smtp import SmtpRecorder
from devkit.topics import create_topics, unique_topic

BOOTSTRAP_ENV = "NOTIFY_TEST_KAFKA_BOOTSTRAP"
POSTGRES_ENV = "NOTIFY_TEST_POSTGRES_URL"

_PROFILE_DEFAULTS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("quick", max_examples=25, **_PROFILE_DEFAULTS)
settings.register_profile("ci", max_examples=100, **_PROFILE_DEFAULTS)
settings.register_profile("thorough", max_examples=1000, **_PROFILE_DEFAULTS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture(scope="session")
def kafka_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaNode]:
    """The session's own broker, for tests that stop, kill or restart it."""
    if os.environ.get(BOOTSTRAP_ENV):
        pytest.fail(f"this test controls the broker itself: unset {BOOTSTRAP_ENV}")
    node = KafkaNode(tmp_path_factory.mktemp("kafka"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """`host:port` of a broker: $NOTIFY_TEST_KAFKA_BOOTSTRAP, else the session's own."""
    if external := os.environ.get(BOOTSTRAP_ENV):
        return external
    node: KafkaNode = request.getfixturevalue("kafka_node")
    return node.bootstrap


@pytest.fixture
async def topic(request: pytest.FixtureRequest, kafka_bootstrap: str) -> str:
    """A fresh 4-partition topic for this test (its dead-letter topic is created with it)."""
    if not os.environ.get(BOOTSTRAP_ENV):
        # A fault test that failed half-way may have left the broker down: don't fail the rest.
        node: KafkaNode = request.getfixturevalue("kafka_node")
        if not node.running:
            node.start()
    name = unique_topic(request.node.name)
    await create_topics(kafka_bootstrap, [name, f"{name}.dlq"], partitions=4)
    return name


@pytest.fixture
def dlq_topic(topic: str) -> str:
    """The dead-letter topic that goes with `topic` (same partitions)."""
    return f"{topic}.dlq"


@pytest.fixture
def smtp_server() -> Iterator[SmtpRecorder]:
    """An SMTP server on 127.0.0.1 (free port) recording each message; see SmtpRecorder."""
    server = SmtpRecorder()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's own PostgreSQL (Debian's binaries), for tests that stop or restart it."""
    if os.environ.get(POSTGRES_ENV):
        pytest.fail(f"this test controls the database server itself: unset {POSTGRES_ENV}")
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> str:
    """URL of a server where tests may create databases: $NOTIFY_TEST_POSTGRES_URL, else
    the session's own cluster."""
    if external := os.environ.get(POSTGRES_ENV):
        return external
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.url()


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest, postgres_server: str) -> Iterator[str]:
    """A fresh, empty database of its own for this test, dropped afterwards."""
    if not os.environ.get(POSTGRES_ENV):
        # A fault test that failed half-way may have left the server down: don't fail the rest.
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        if not cluster.running:
            cluster.start()
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield create_database(postgres_server, name)
    drop_database(postgres_server, name)


# --- a real browser: Debian's chromium, driven by Playwright (never its own download) ------

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the page and mail layout tests (a playwright Browser)."""
    from playwright.sync_api import sync_playwright  # only the browser tests load it

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--headless",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $NOTIFY_SCREENSHOTS_DIR, else a temporary folder."""
    chosen = os.environ.get("NOTIFY_SCREENSHOTS_DIR")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
