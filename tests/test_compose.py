"""docker-compose.yml agrees with the settings model, the Dockerfile and the deploy files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.runtime.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str) -> str:
    """`${VAR:-default}` and `${VAR}` as docker compose fills them with nothing exported."""
    return _VARIABLE.sub(lambda m: m[2] or "", value)


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    env = compose["services"][name]["environment"]
    assert isinstance(env, dict)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def notifier_env(compose: dict[str, Any]) -> dict[str, str]:
    return service_env(compose, "notifier")


def test_every_notify_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    env = notifier_env(compose)
    assert env, "the notifier service sets no environment"
    unknown = {name for name in env if name.startswith(ENV_PREFIX)} - known
    assert unknown == set()


def test_the_compose_environment_validates(compose: dict[str, Any]) -> None:
    env = notifier_env(compose)
    values = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()}
    settings = load_settings(**values)
    assert settings.smtp_host == "mailpit"


def test_the_replicas_share_one_postgresql_ledger(compose: dict[str, Any]) -> None:
    services = compose["services"]
    notifier = services["notifier"]
    replicas = notifier["deploy"]["replicas"]
    assert replicas >= 2
    assert "container_name" not in notifier  # one name cannot go to several containers
    # A SQLite file per replica would let two of them send the same mail: no ledger volume.
    assert not notifier.get("volumes")
    url = urlsplit(notifier_env(compose)["NOTIFY_LEDGER_URL"])
    assert url.scheme in ("postgresql", "postgres")
    assert url.hostname == "postgres"
    assert (url.port or 5432) == 5432
    db = service_env(compose, "postgres")
    assert (url.username, url.password, url.path) == (
        db["POSTGRES_USER"],
        db["POSTGRES_PASSWORD"],
        f"/{db['POSTGRES_DB']}",
    )
    assert notifier["depends_on"]["postgres"]["condition"] == "service_healthy"
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    # The data on a named volume, where the image keeps it: /var/lib/postgresql/data up to
    # 17, /var/lib/postgresql from 18 on (a mount elsewhere is silently not persisted).
    major = int(str(postgres["image"]).rpartition(":")[2].split(".")[0])
    data = "/var/lib/postgresql/data" if major <= 17 else "/var/lib/postgresql"
    volumes = {str(v).split(":")[1]: str(v).split(":")[0] for v in postgres["volumes"]}
    assert volumes[data] in compose["volumes"]
    # Every replica finds partitions to take: at least as many as replicas.
    kafka_env = services["kafka"]["environment"]
    assert int(kafka_env["KAFKA_NUM_PARTITIONS"]) >= replicas


def _container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).rsplit(":", 1)[1]))
    return ports


def _host_ports(mapping: str) -> range:
    """The host ports of a short-syntax mapping `[IP:]HOST[-HOST]:CONTAINER`."""
    host = str(mapping).rsplit(":", 1)[0].rpartition(":")[2]
    first, _, last = host.partition("-")
    return range(int(first), int(last or first) + 1)


def test_ports_line_up(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = notifier_env(compose)
    http_port = int(env["NOTIFY_HTTP_PORT"])
    assert http_port in _container_ports(services["notifier"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {http_port}$", dockerfile, re.M)
    # One host port per replica: a single port could be bound by one container only.
    (mapping,) = services["notifier"]["ports"]
    assert len(_host_ports(mapping)) >= services["notifier"]["deploy"]["replicas"]

    assert env["NOTIFY_SMTP_HOST"] == "mailpit"
    assert int(env["NOTIFY_SMTP_PORT"]) == 1025  # Mailpit's SMTP port

    host, port = env["NOTIFY_KAFKA_BOOTSTRAP_SERVERS"].split(":")
    assert host == "kafka"
    kafka_env = services["kafka"]["environment"]
    assert f"PLAINTEXT://kafka:{port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://:{port}" in kafka_env["KAFKA_LISTENERS"]


def test_prometheus_scrapes_every_replica(compose: dict[str, Any]) -> None:
    # A static "notifier:8000" would reach one replica (whichever the name resolves to);
    # DNS service discovery of type A makes a target of every container of the service.
    http_port = int(notifier_env(compose)["NOTIFY_HTTP_PORT"])
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "notifier"]
    assert not job.get("static_configs")
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A"
    assert sd["names"] == ["notifier"]
    assert sd["port"] == http_port
    assert "notifier" in compose["services"]


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    env = notifier_env(compose)
    # Paths inside the image are the repository's paths under /app.
    for name in ("NOTIFY_DIRECTORY_FILE", "NOTIFY_ATTACHMENTS_DIR"):
        assert env[name].startswith("/app/")
        assert (ROOT / env[name].removeprefix("/app/")).exists(), name


def test_every_image_is_pinned_to_a_version(compose: dict[str, Any]) -> None:
    # `latest` (or no tag, which means latest) changes under a running setup without notice.
    images = {
        name: str(service["image"])
        for name, service in compose["services"].items()
        if "image" in service
    }
    assert {"kafka", "mailpit", "postgres", "prometheus", "grafana"} <= set(images)
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        # PostgreSQL numbers its releases MAJOR.MINOR (17.6): that is a release too.
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?", tag), f"{name}: {image} is not a version"
    assert images["mailpit"].startswith("axllent/mailpit:v")


def test_the_image_uses_its_packaged_templates_and_the_locked_dependencies(
    compose: dict[str, Any],
) -> None:
    # The wheel carries the templates (tests/test_packaging.py): nothing points elsewhere.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "NOTIFY_TEMPLATES_DIR" not in notifier_env(compose)
    assert "NOTIFY_TEMPLATES_DIR=" not in dockerfile
    # Dependencies come from uv.lock, exported by the uv version the lock itself pins.
    assert re.search(r"^COPY pyproject\.toml uv\.lock ", dockerfile, re.M)
    assert "uv export --frozen" in dockerfile
    assert "--require-hashes" in dockerfile
    locked = re.search(r'^name = "uv"\nversion = "([^"]+)"', (ROOT / "uv.lock").read_text(), re.M)
    assert locked is not None
    assert f'pip install "uv=={locked[1]}"' in dockerfile
